"""Beam's DaskRunner with the two faults that stop the corpus stage fixed (scripts/repro_dask_runner.py):

  1. a ParDo's outputs are routed by tag: each bundle yields (tag, value) pairs and every output PCollection reads
     its own tag (upstream gives every output the ParDo's whole bag);
  2. every sink runs: the graph computed is that of every PCollection nothing consumes (upstream computes only the
     last transform applied, so rejected.jsonl, say, is never written).

Everything else is upstream's (apache_beam.runners.dask, 2.77). The client the runner opens is closed when the
pipeline finishes.

    emojax corpus build ... --runner=emojax.pipelines.dask_runner.DaskRunner --dask_client_address=tcp://HOST:8786
"""

from __future__ import annotations

import dataclasses

import dask
from apache_beam import DoFn, TaggedOutput, pvalue
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
from apache_beam.runners.dask import dask_runner, transform_evaluator
from apache_beam.runners.dask.overrides import dask_overrides
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.utils.windowed_value import WindowedValue


def run_bundle(items, fn, window_fn, side_inputs, args, kwargs, label: str) -> list[tuple[str | None, object]]:
    """One Dask partition through the DoFn: its outputs as (tag, value), None for the main output."""
    receivers = transform_evaluator.OneReceiver()  # made here: one per bundle, never shared between tasks
    handler = _OutputHandler(window_fn=window_fn, main_receivers=receivers[None], tagged_receivers=receivers,
                             per_element_output_counter=None, output_batch_converter=None,
                             process_yields_batches=False, process_batch_yields_elements=False)
    invoker = DoFnInvoker.create_invoker(DoFnSignature(fn), handler, context=DoFnContext(label, state=None),
                                         side_inputs=side_inputs, input_args=args, input_kwargs=kwargs,
                                         user_state_context=None, bundle_finalizer_param=DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()  # before the outputs are read: finish_bundle may output too
    invoker.invoke_teardown()
    pairs = [(v.tag, v.value) if isinstance(v, TaggedOutput) else (None, v) for v in receivers.values]
    return [(tag, v.value if isinstance(v, WindowedValue) else v) for tag, v in pairs]


class ParDo(transform_evaluator.DaskBagOp):
    """A ParDo as a bag of (tag, value) pairs, each output to be selected from it by tag."""

    def apply(self, input_bag, side_inputs=None):
        main_input = next(iter(self.applied.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
        args, kwargs = self.transform.raw_side_inputs
        return input_bag.map(transform_evaluator.get_windowed_value, window_fn).map_partitions(
            run_bundle, self.transform.fn, window_fn, side_inputs, list(args), kwargs, self.transform.label)


TRANSLATIONS = {**transform_evaluator.TRANSLATIONS, transform_evaluator.apache_beam.ParDo: ParDo}


@dataclasses.dataclass
class BagVisitor(PipelineVisitor):
    """Each PCollection's bag, and the PCollections (or output-less transforms) nothing reads: the sinks."""

    bag_kwargs: dict
    bags: dict = dataclasses.field(default_factory=dict)
    sinks: dict = dataclasses.field(default_factory=dict)

    def visit_transform(self, node: AppliedPTransform) -> None:
        op = TRANSLATIONS.get(node.transform.__class__, transform_evaluator.NoOp)(node, bag_kwargs=self.bag_kwargs)
        inputs = [self.bags[i] for i in node.inputs if not isinstance(i, pvalue.PBegin)]
        for pcoll in [*node.inputs, *(si.pvalue for si in node.side_inputs)]:
            self.sinks.pop(pcoll, None)
        side_inputs = [SideInputMap(type(si), si._view_options(),
                                    transform_evaluator.DaskBagWindowedIterator(self.bags[si.pvalue],
                                                                                si._window_mapping_fn))
                       for si in node.side_inputs] or None
        single = len(inputs) == 1 and not isinstance(op, transform_evaluator.Flatten)
        bag = op.apply(input_bag=(inputs[0] if single else inputs) if inputs else None, side_inputs=side_inputs)
        for pcoll in node.outputs.values():
            self.bags[pcoll] = (bag.filter(lambda pair, tag=pcoll.tag: pair[0] == tag).map(lambda pair: pair[1])
                                if isinstance(op, ParDo) else bag)
            self.sinks[pcoll] = self.bags[pcoll]
        if not node.outputs:
            self.sinks[node] = bag


@dataclasses.dataclass
class DaskRunnerResult(dask_runner.DaskRunnerResult):
    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            self.client.close()


class DaskRunner(dask_runner.DaskRunner):
    """Executes a pipeline on a dask.distributed cluster (--dask_client_address), every sink included."""

    def run_pipeline(self, pipeline, options):
        from distributed import Client

        dask_options = options.view_as(dask_runner.DaskOptions).get_all_options(drop_default=True, current_only=True)
        visitor = BagVisitor(dask_runner.DaskOptions._extract_bag_kwargs(dask_options))
        client = Client(**dask_options)
        pipeline.replace_all(dask_overrides())
        pipeline.visit(visitor)
        sinks = [bag for bag in visitor.sinks.values() if bag is not None]
        return DaskRunnerResult(client, client.compute(list(dask.optimize(*sinks))))

"""Data screening (`emojax screen`): which prompt/response samples read high on a concept, by the mean projection of
their response tokens and by its difference from the model's own response to the same prompt (METHOD.md section
6, persona vectors' data flagging). docs/screen.md has the formulas, the outputs and the flag rules.

    from emojax.screen.run import screen     # the driver (imports Apache Beam; kept out of this package's import)
    manifest = screen(ScreenConfig(data=("train.jsonl",), bank="runs/x/concepts", concepts=("angry",), out="scr"))

Modules: config (the `screen:` section), score (the per-sample scores and the worker's scorer), flags (ranking
and flag rules), run (the driver), commands (the CLI); the Beam pipeline is emojax.pipelines.screen.
"""

from emojax.screen.config import FlagRule, ScreenConfig, ScreenError
from emojax.screen.flags import Flags, flag, rank
from emojax.screen.score import ScoringSpec, column

__all__ = ["FlagRule", "Flags", "ScoringSpec", "ScreenConfig", "ScreenError", "column", "flag", "rank"]

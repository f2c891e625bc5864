"""`emojax serve`: a model behind an OpenAI-compatible HTTP API that streams each token's concept readings and
alerts, takes steering per request, and shows a live monitoring page.

    app = create_app(engine, tokenizer, ServeConfig())   # engine: emojax.serve.engine.Engine (EngineLike)
    run_server(app)                                       # uvicorn; SIGTERM drains it

The command (`emojax serve --model M --bank B`) lives in emojax.serve.commands, uvicorn in emojax.serve.server,
the wire format in emojax.serve.protocol, the engine interface in emojax.serve.types.
"""

from emojax.serve.app import ServeState, create_app
from emojax.serve.config import ServeConfig
from emojax.serve.server import run_server
from emojax.serve.types import EngineLike, EngineStats, GenerationRequest, PromptReadings, TokenEvent

__all__ = ["EngineLike", "EngineStats", "GenerationRequest", "PromptReadings", "ServeConfig", "ServeState",
           "TokenEvent", "create_app", "run_server"]

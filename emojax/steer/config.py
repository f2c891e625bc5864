"""Settings of the run's steer stage (the `steer:` section): its steering curves and monitored sample."""

from __future__ import annotations

import dataclasses

from emojax.config_loader import config_section, positive, unbounded


@config_section("steer")
@dataclasses.dataclass(frozen=True)
class SteerSettings:
    concepts: tuple[str, ...] = ("desperate", "calm", "afraid", "joyful")  # those in the bank are used
    strengths: tuple[float, ...] = unbounded((-0.2, -0.1, 0.0, 0.1, 0.2))  # fractions of the layer's mean norm
    prompts: tuple[str, ...] = ("I opened the letter and", "The meeting started late, and she",
                                "When the phone rang at midnight, he")
    max_new_tokens: int = positive(24)
    monitor_prompt: str = "The deadline was in an hour and nothing worked. She"
    monitor_new_tokens: int = positive(40)

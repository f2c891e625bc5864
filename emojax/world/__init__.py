"""The built-in emotion world: a seeded generator of text in which an emotion variable is the cheapest way to
predict what comes next (docs/world.md).

    from emojax.world import World, WorldConfig, write_world_suites, world_entropy

    world = World(WorldConfig(seed=0))
    docs = world.training_documents(18_000)            # stories, dialogues, choice scenes + neutral dialogues
    corpus = world.fit_corpus({"train": 40, "val": 10, "test": 10}, implicit_per_emotion=5)
    [d.as_corpus_document() for d in corpus]            # what the corpus stage reads (with d.split alongside)
    world.true_probabilities(doc.scene)                 # the known P(option | emotion) of a choice scene
    world_entropy(docs, count_tokens)                   # the world's own entropy per document and per token

Modules: coordinates (the 171 concepts' graded coordinates), appraisal (situations -> P(emotion | situation), the
held-out split), narration and documents (the text), choices (the choice scenes), draws (recorded randomness),
entropy, suites (the scenes as experiment suites), emotion_words (the emotion-word check).
"""

from emojax.world.appraisal import PARTS, SPLITS, Situation, situation
from emojax.world.choices import KINDS as CHOICE_KINDS
from emojax.world.choices import Scene, option_probabilities
from emojax.world.coordinates import DIMS, Coordinates, load_coordinates
from emojax.world.documents import WorldDocument
from emojax.world.emotion_words import emotion_words_in
from emojax.world.entropy import EntropyEstimate, world_entropy
from emojax.world.suites import write_world_suites
from emojax.world.world import World, WorldConfig

__all__ = [
    "CHOICE_KINDS", "DIMS", "PARTS", "SPLITS", "Coordinates", "EntropyEstimate", "Scene", "Situation", "World",
    "WorldConfig", "WorldDocument", "emotion_words_in", "load_coordinates", "option_probabilities", "situation",
    "world_entropy", "write_world_suites",
]

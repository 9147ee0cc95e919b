"""
The vision demo task: name the colour of the shape in a small picture.

Every prompt is one 48 x 48 image, a square or a disc of one of eight colours at a random place and size on a noisy
grey background, and the same question; the answer is one word::

    <image: a yellow disc>  what colour is the shape ?   ->   yellow

The image is 36 of the prompt's 45 tokens (Qwen2.5-VL's vision tower turns 12 x 12 patches of 4 x 4 pixels into
6 x 6 merged tokens), so the `num_generations` completions of a prompt share an image prefix, which Prefix Grouper
encodes once, vision tower included.

The vocabulary is closed: a word-level tokenizer with the Qwen-VL placeholder tokens covers it exactly (see
`vision_processor.py`). From random initialisation the tiny model first learns to answer with a colour word at all
(partial credit, see `rewards.colour_reward`), then to read the colour off the image.
"""

import random
from dataclasses import dataclass

from .task import task_from_spec

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 220, 40),
    "cyan": (40, 220, 225),
    "magenta": (220, 40, 210),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
}
COLOUR_WORDS = list(COLOURS)
SHAPES = ["square", "disc"]
QUESTION = "what colour is the shape ?"
IMAGE_SIZE = 48


@dataclass(frozen=True)
class ColourTask:
    """
    Parameters of the synthetic task; the defaults are those of `recipes/tiny-vlm-cpu.yaml`.

    Args:
        num_colours: how many of the eight colours can be the answer (chance level is ``1 / num_colours``).
        num_train, num_test: rows of the splits.
        seed: seed of the generator; the same seed gives the same images on every process.
    """

    num_colours: int = 4
    num_train: int = 2048
    num_test: int = 32
    seed: int = 1234

    def __post_init__(self):
        if not 2 <= self.num_colours <= len(COLOURS):
            raise ValueError(f"num_colours={self.num_colours}: must be between 2 and {len(COLOURS)}.")
        if self.num_train < 1 or self.num_test < 0:
            raise ValueError("num_train must be >= 1 and num_test >= 0.")

    @classmethod
    def from_spec(cls, spec: str | None) -> "ColourTask":
        """Parse ``"num_colours=4,num_train=512"`` (the CLI's ``dataset_config``); unknown names are an error."""
        return task_from_spec(cls, spec, "colour")


def draw_shape_image(colour: str, shape: str, rng: random.Random):
    """A `PIL.Image` of `IMAGE_SIZE` pixels: grey noise, and one shape of `colour`."""
    from PIL import Image, ImageDraw

    size = IMAGE_SIZE
    noise = bytes(rng.randrange(70, 150) for _ in range(size * size))
    image = Image.frombytes("L", (size, size), noise).convert("RGB")
    extent = rng.randrange(14, 30)
    left, top = rng.randrange(0, size - extent), rng.randrange(0, size - extent)
    box = (left, top, left + extent, top + extent)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.ellipse(box, fill=COLOURS[colour])
    return image


def make_colour_example(task: ColourTask, rng: random.Random) -> dict:
    """One row: ``{"prompt": [user message], "image": PIL image, "answer": colour word}``."""
    colour = COLOUR_WORDS[rng.randrange(task.num_colours)]
    image = draw_shape_image(colour, rng.choice(SHAPES), rng)
    return {"prompt": [{"role": "user", "content": QUESTION}], "image": image, "answer": colour}


def make_colour_dataset(task: ColourTask | None = None):
    """
    The builtin dataset as a `datasets.DatasetDict` (``train``, ``test``), columns ``prompt`` (conversational: TRL
    puts the row's ``image`` in front of the question), ``image`` and ``answer``. Deterministic in ``task.seed``.
    """
    from datasets import Dataset, DatasetDict

    task = task or ColourTask()
    rng = random.Random(task.seed)
    splits = {}
    for name, rows in (("train", task.num_train), ("test", task.num_test)):
        examples = [make_colour_example(task, rng) for _ in range(rows)]
        columns = ("prompt", "image", "answer")
        splits[name] = Dataset.from_dict({key: [example[key] for example in examples] for key in columns})
    return DatasetDict(splits)

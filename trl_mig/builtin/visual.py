"""The built-in visual task: count coloured shapes in a synthetic scene, with a worked multi-step solution.

A scene is a few coloured shapes (circle, square, triangle in red, green, blue, yellow) drawn with PIL in the cells of
a 4 x 4 grid, so "left of" is unambiguous (a smaller column). Three kinds of question, each solved by filtering the
objects step by step and counting::

    How many red objects are left of the blue circle?
    <think>### Step 1
    The blue circle is in column 3.
    ### Step 2
    Left of column 3: red square, green circle, red triangle.
    ### Step 3
    Red ones: red square, red triangle.
    ### Step 4
    Count: 2
    </think>
    <answer>2</answer>

The other kinds are "How many <colour> objects are there?" and "How many <shape>s are not <colour>?". Rows have the
columns `prompt` (chat messages), `image` (a PIL image, which TRL's GRPOTrainer puts into the prompt), `solution`
(the count), `gold_completion`, `question_type` and `num_objects`. Splits `train`, `validation` and `test` draw
`min_objects`-`max_objects` objects and never share a scene and question; `ood` has more objects. Every split is a
pure function of the configuration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .task import SCAFFOLD

GRID = 4  # cells per side
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("colour_count", "left_of", "not_colour")
PROMPT_SUFFIX = " Format: <think>### Step 1 ...</think><answer>...</answer>"
SPLITS = ("train", "validation", "test", "ood")
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class VisualTaskConfig:
    """Sizes and difficulty of the built-in visual counting task."""

    seed: int = 0
    train_size: int = 2000
    validation_size: int = 100
    test_size: int = 100
    ood_size: int = 100
    image_size: int = 112  # pixels per side
    min_objects: int = 3
    max_objects: int = 6
    ood_extra_objects: int = 3  # ood scenes have max_objects + 1 .. max_objects + this objects

    def __post_init__(self):
        for name in ("train_size", "validation_size", "test_size", "ood_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"visual task {name} must be >= 0, got {getattr(self, name)}.")
        if not 2 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"visual task min_objects={self.min_objects} and max_objects={self.max_objects} must satisfy "
                "2 <= min_objects <= max_objects."
            )
        if self.max_objects + self.ood_extra_objects > GRID * GRID:
            raise ValueError(f"visual task scenes hold at most {GRID * GRID} objects (a {GRID}x{GRID} grid).")
        if self.ood_extra_objects < 1:
            raise ValueError(f"visual task ood_extra_objects must be >= 1, got {self.ood_extra_objects}.")
        if self.image_size < 4 * GRID:
            raise ValueError(f"visual task image_size must be >= {4 * GRID} pixels, got {self.image_size}.")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    row: int
    column: int  # 1 = leftmost

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class VisualProblem:
    objects: tuple[SceneObject, ...]
    question_type: str
    colour: str
    shape: str | None = None  # the anchor's shape (left_of) or the counted shape (not_colour)
    anchor_colour: str | None = None

    @property
    def key(self) -> tuple:
        return (self.objects, self.question_type, self.colour, self.shape, self.anchor_colour)

    def question(self) -> str:
        if self.question_type == "colour_count":
            return f"How many {self.colour} objects are there?"
        if self.question_type == "left_of":
            return f"How many {self.colour} objects are left of the {self.anchor_colour} {self.shape}?"
        return f"How many {self.shape}s are not {self.colour}?"

    def steps(self) -> tuple[list[str], int]:
        """The worked solution's steps (one filtering or counting step each) and the answer."""
        ordered = sorted(self.objects, key=lambda o: (o.column, o.row))
        names = lambda objects: ", ".join(o.name for o in objects) or "none"  # noqa: E731
        if self.question_type == "colour_count":
            chosen = [o for o in ordered if o.colour == self.colour]
            steps = [f"Objects: {names(ordered)}.", f"{self.colour.capitalize()} ones: {names(chosen)}."]
        elif self.question_type == "left_of":
            anchor = next(o for o in ordered if (o.colour, o.shape) == (self.anchor_colour, self.shape))
            left = [o for o in ordered if o.column < anchor.column]
            chosen = [o for o in left if o.colour == self.colour]
            steps = [
                f"The {anchor.name} is in column {anchor.column}.",
                f"Left of column {anchor.column}: {names(left)}.",
                f"{self.colour.capitalize()} ones: {names(chosen)}.",
            ]
        else:
            shapes = [o for o in ordered if o.shape == self.shape]
            chosen = [o for o in shapes if o.colour != self.colour]
            steps = [f"{self.shape.capitalize()}s: {names(shapes)}.", f"Not {self.colour}: {names(chosen)}."]
        return [*steps, f"Count: {len(chosen)}"], len(chosen)

    def worked_solution(self) -> str:
        steps, answer = self.steps()
        body = "".join(f"### Step {i}\n{text}\n" for i, text in enumerate(steps, start=1))
        return f"<think>{body}{SCAFFOLD}{answer}</answer>"

    def row(self, image_size: int) -> dict:
        _, answer = self.steps()
        return {
            "prompt": [{"role": "user", "content": self.question() + PROMPT_SUFFIX}],
            "image": draw_scene(self.objects, image_size),
            "solution": str(answer),
            "gold_completion": self.worked_solution(),
            "question_type": self.question_type,
            "num_objects": len(self.objects),
        }


def draw_scene(objects, image_size: int):
    """The scene as an RGB PIL image of `image_size` x `image_size` pixels."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    margin = max(1.0, cell * 0.15)
    for o in objects:
        left, top = (o.column - 1) * cell + margin, (o.row - 1) * cell + margin
        right, bottom = o.column * cell - margin, o.row * cell - margin
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif o.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


def sample_problem(rng: random.Random, num_objects: int) -> VisualProblem:
    cells = rng.sample([(row, column) for row in range(1, GRID + 1) for column in range(1, GRID + 1)], num_objects)
    objects = tuple(
        SceneObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), row, column) for row, column in sorted(cells)
    )
    kinds = list(QUESTION_TYPES)
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[(o.colour, o.shape)] = counts.get((o.colour, o.shape), 0) + 1
    unique = [key for key, count in counts.items() if count == 1]
    if not unique:  # "left of the blue circle" needs exactly one blue circle
        kinds.remove("left_of")
    kind = rng.choice(kinds)
    # mostly a colour in the scene, so that counts of 0 do not dominate
    present = sorted({o.colour for o in objects})
    colour = rng.choice(present) if rng.random() < 0.8 else rng.choice(list(COLOURS))
    if kind == "left_of":
        anchor_colour, shape = rng.choice(sorted(unique))
        return VisualProblem(objects, kind, colour, shape, anchor_colour)
    if kind == "not_colour":
        return VisualProblem(objects, kind, colour, rng.choice(sorted({o.shape for o in objects})))
    return VisualProblem(objects, kind, colour)


def generate_visual_splits(config: VisualTaskConfig | None = None, splits=SPLITS) -> dict[str, list[VisualProblem]]:
    """
    Problems of each requested split; `train`, `validation` and `test` never share a problem (same scene and
    question), `ood` has more objects per scene. Each split has its own random stream.
    """
    config = config or VisualTaskConfig()
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown} of the built-in visual task; expected some of {list(SPLITS)}.")
    sizes = {
        "train": (config.train_size, config.min_objects, config.max_objects),
        "validation": (config.validation_size, config.min_objects, config.max_objects),
        "test": (config.test_size, config.min_objects, config.max_objects),
        "ood": (config.ood_size, config.max_objects + 1, config.max_objects + config.ood_extra_objects),
    }
    seen: set = set()
    drawn = {}
    for name in ("train", "test", "validation", "ood"):  # later in-distribution splits exclude earlier ones
        if name not in splits and not (name in ("train", "test") and {"test", "validation"} & set(splits)):
            continue
        size, low, high = sizes[name]
        rng = random.Random(f"trl-mig/{config.seed}/visual/{name}")
        problems, attempts = [], 0
        while len(problems) < size:
            attempts += 1
            if attempts > 50 * size + 1000:
                raise ValueError(f"Could not draw {size} distinct visual problems for split {name!r}.")
            problem = sample_problem(rng, rng.randint(low, high))
            if problem.key in seen:
                continue
            seen.add(problem.key)
            problems.append(problem)
        drawn[name] = problems
    return {name: drawn[name] for name in splits}


def load_visual_dataset(config: VisualTaskConfig | None = None, splits=SPLITS):
    """The task as a `datasets.DatasetDict`: columns prompt, image, solution, gold_completion, question_type,
    num_objects."""
    from datasets import Dataset, DatasetDict

    config = config or VisualTaskConfig()
    problems = generate_visual_splits(config, splits)
    return DatasetDict(
        {name: Dataset.from_list([p.row(config.image_size) for p in rows]) for name, rows in problems.items()}
    )

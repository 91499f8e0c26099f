"""Embedded demo data: procedurally rendered scenes of coloured shapes, with rich annotations.

Every scene is a pure function of (split seed, index): no downloads, no files. 1-3 objects
(COLORS x SHAPES) on a plain background; the largest is the primary one, its "colour shape"
the class label (24 classes). A sample has `image` (uint8 [S, S, 3]), `caption`,
`short_caption`, `long_caption` (details after the first 77 tokens), `detail_caption` (the
same details reworded, without the preamble: a second description of the image), `label`, `boxes`
(normalized xyxy, primary first) with `region_captions` / `region_labels`, and `captions_ml`
({lang: caption} in LANGUAGES). Splits use disjoint seed streams (SPLIT_SEEDS). Details:
docs/data.md.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 80, 215),
    "yellow": (235, 205, 35), "purple": (145, 55, 185), "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 242), "light gray": (200, 200, 198), "gray": (140, 140, 140),
    "dark gray": (75, 75, 78), "black": (20, 20, 22),
}
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"),
             ("bottom left", "bottom", "bottom right"))
SPLIT_SEEDS: dict[str, int] = {"train": 0, "zeroshot": 1, "retrieval": 2, "regions": 3,
                               "multilingual": 4, "test": 5, "fewshot": 6}
SUPERSAMPLE = 4
MAX_OBJECTS = 3

ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a drawing of a {}.", "a rendering of a {}.", "a picture of a {}.",
    "a {} on a plain background.", "an illustration of a {}.")

# ----------------------------------------------------------------------------- languages

LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es", "ru", "zh", "ar", "ja")

# Per language: colour words (masculine, neuter, feminine where grammar needs them), shape
# words with grammatical gender, and aligned templates (template k is a translation of the
# English template k). Class names include the article where the language needs it to agree.
_M, _N, _F = "m", "n", "f"
_SHAPE_WORDS: dict[str, dict[str, tuple[str, str]]] = {
    "en": {"circle": ("circle", _M), "square": ("square", _M), "triangle": ("triangle", _M),
           "star": ("star", _M)},
    "de": {"circle": ("Kreis", _M), "square": ("Quadrat", _N), "triangle": ("Dreieck", _N),
           "star": ("Stern", _M)},
    "fr": {"circle": ("cercle", _M), "square": ("carré", _M), "triangle": ("triangle", _M),
           "star": ("étoile", _F)},
    "es": {"circle": ("círculo", _M), "square": ("cuadrado", _M), "triangle": ("triángulo", _M),
           "star": ("estrella", _F)},
    "ru": {"circle": ("круг", _M), "square": ("квадрат", _M), "triangle": ("треугольник", _M),
           "star": ("звезда", _F)},
    "zh": {"circle": ("圆形", _M), "square": ("正方形", _M), "triangle": ("三角形", _M),
           "star": ("星形", _M)},
    "ar": {"circle": ("دائرة", _F), "square": ("مربع", _M), "triangle": ("مثلث", _M),
           "star": ("نجمة", _F)},
    "ja": {"circle": ("円", _M), "square": ("四角形", _M), "triangle": ("三角形", _M),
           "star": ("星", _M)},
}
# colour -> {gender: form}; a single string is gender-invariant.
_COLOR_WORDS: dict[str, dict[str, dict[str, str] | str]] = {
    "en": {c: c for c in COLORS},
    # German, nominative after "ein": m -er, n -es (strong adjective endings).
    "de": {"red": {_M: "roter", _N: "rotes"}, "green": {_M: "grüner", _N: "grünes"},
           "blue": {_M: "blauer", _N: "blaues"}, "yellow": {_M: "gelber", _N: "gelbes"},
           "purple": {_M: "violetter", _N: "violettes"},
           "orange": {_M: "orangefarbener", _N: "orangefarbenes"}},
    "fr": {"red": "rouge", "green": {_M: "vert", _F: "verte"}, "blue": {_M: "bleu", _F: "bleue"},
           "yellow": "jaune", "purple": {_M: "violet", _F: "violette"}, "orange": "orange"},
    "es": {"red": {_M: "rojo", _F: "roja"}, "green": "verde", "blue": "azul",
           "yellow": {_M: "amarillo", _F: "amarilla"}, "purple": {_M: "morado", _F: "morada"},
           "orange": "naranja"},
    "ru": {"red": {_M: "красный", _F: "красная"}, "green": {_M: "зелёный", _F: "зелёная"},
           "blue": {_M: "синий", _F: "синяя"}, "yellow": {_M: "жёлтый", _F: "жёлтая"},
           "purple": {_M: "фиолетовый", _F: "фиолетовая"},
           "orange": {_M: "оранжевый", _F: "оранжевая"}},
    "zh": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
           "orange": "橙色"},
    "ar": {"red": {_M: "أحمر", _F: "حمراء"}, "green": {_M: "أخضر", _F: "خضراء"},
           "blue": {_M: "أزرق", _F: "زرقاء"}, "yellow": {_M: "أصفر", _F: "صفراء"},
           "purple": {_M: "بنفسجي", _F: "بنفسجية"}, "orange": {_M: "برتقالي", _F: "برتقالية"}},
    "ja": {"red": "赤色", "green": "緑色", "blue": "青色", "yellow": "黄色", "purple": "紫色",
           "orange": "オレンジ色"},
}
_ARTICLES: dict[str, dict[str, str]] = {
    "de": {_M: "ein", _N: "ein"}, "fr": {_M: "un", _F: "une"}, "es": {_M: "un", _F: "una"},
}
_ML_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("a photo of {}.", "a drawing of {}.", "a picture showing {}."),
    "de": ("Ein Foto: {}.", "Eine Zeichnung: {}.", "Auf dem Bild ist {}."),
    "fr": ("une photo montrant {}.", "un dessin représentant {}.", "une image avec {}."),
    "es": ("una foto de {}.", "un dibujo de {}.", "una imagen que muestra {}."),
    "ru": ("фотография: {}.", "рисунок: {}.", "на картинке {}."),
    "zh": ("一张{}的照片。", "一幅{}的画。", "图中是一个{}。"),
    "ar": ("صورة {}.", "رسم {}.", "صورة تظهر {}."),
    "ja": ("{}の写真。", "{}の絵。", "{}が写っている画像。"),
}


def _class_phrase(lang: str, color: str, shape: str) -> str:
  """The class name "colour shape" in `lang`, with agreement (and article where needed)."""
  if lang not in _SHAPE_WORDS:
    raise ValueError(f"unknown demo language {lang!r}; known: {', '.join(LANGUAGES)}")
  noun, gender = _SHAPE_WORDS[lang][shape]
  forms = _COLOR_WORDS[lang][color]
  adj = forms if isinstance(forms, str) else forms[gender]
  if lang == "zh":
    return f"{adj}{noun}"
  if lang == "en":
    return f"{adj} {noun}"
  if lang == "ja":
    return f"{adj}の{noun}"
  if lang == "de":
    return f"{_ARTICLES[lang][gender]} {adj} {noun}"
  if lang in ("fr", "es"):
    return f"{_ARTICLES[lang][gender]} {noun} {adj}"
  if lang == "ar":
    return f"{noun} {adj}"
  return f"{adj} {noun}"  # ru: adjective before noun, nominative


def num_classes() -> int:
  return len(COLORS) * len(SHAPES)


def class_index(color: str, shape: str) -> int:
  return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def class_names(lang: str = "en") -> list[str]:
  """The 24 class names ("red circle", ...) in `lang`, index = label."""
  return [_class_phrase(lang, c, s) for c in COLORS for s in SHAPES]


def templates(lang: str = "en") -> list[str]:
  """Zero-shot prompt templates with a `{}` placeholder (English: ZERO_SHOT_TEMPLATES)."""
  if lang == "en":
    return list(ZERO_SHOT_TEMPLATES)
  if lang not in _ML_TEMPLATES:
    raise ValueError(f"unknown demo language {lang!r}; known: {', '.join(LANGUAGES)}")
  return list(_ML_TEMPLATES[lang])


# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class DemoObject:
  color: str
  shape: str
  cx: float  # centre, normalized to [0, 1]
  cy: float
  size: float  # extent (diameter / side), normalized to the image side
  angle: float  # rotation in radians (squares, triangles, stars)
  rgb: tuple[int, int, int]

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"

  @property
  def label(self) -> int:
    return class_index(self.color, self.shape)


@dataclasses.dataclass(frozen=True)
class DemoScene:
  objects: tuple[DemoObject, ...]  # primary (largest) first
  background: str
  bg_rgb: tuple[int, int, int]
  gradient: tuple[float, float]  # background brightness slope along (x, y)
  noise_seed: int


def _rng(split_seed: int, index: int, stream: int = 0) -> np.random.Generator:
  return np.random.default_rng([int(split_seed), int(index), int(stream)])


def sample_scene(split_seed: int, index: int) -> DemoScene:
  """The scene layout of sample `index` of the split with seed `split_seed` (deterministic)."""
  rng = _rng(split_seed, index)
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  objects: list[DemoObject] = []
  kinds: set[tuple[str, str]] = set()
  for k in range(n):
    primary = k == 0
    size = float(rng.uniform(0.38, 0.52) if primary else rng.uniform(0.12, 0.22))
    for _ in range(50):  # rejection sampling: little overlap with earlier objects
      cx, cy = (float(v) for v in rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02, size=2))
      if all(math.hypot(cx - o.cx, cy - o.cy) > 0.5 * (size + o.size) + 0.01 for o in objects):
        break
    else:
      break  # no room left: fewer objects
    while True:
      color, shape = COLORS[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
      if (color, shape) not in kinds:
        break
    kinds.add((color, shape))
    jitter = rng.integers(-18, 19, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOR_RGB[color], jitter))
    objects.append(DemoObject(color, shape, cx, cy, size, float(rng.uniform(0, 2 * math.pi)), rgb))
  background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
  gradient = tuple(float(v) for v in rng.uniform(-25, 25, size=2))
  return DemoScene(tuple(objects), background, BACKGROUNDS[background], gradient,
                   int(rng.integers(2**31)))


def _polygon(obj: DemoObject, scale: float) -> list[tuple[float, float]]:
  r = obj.size * scale / 2
  cx, cy = obj.cx * scale, obj.cy * scale
  if obj.shape == "square":
    r_v, count = r, 4  # circumradius chosen so the square is inscribed in the extent circle
  elif obj.shape == "triangle":
    r_v, count = r, 3
  elif obj.shape == "star":
    pts = []
    for i in range(10):
      rad = r if i % 2 == 0 else r * 0.45
      a = obj.angle + i * math.pi / 5
      pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts
  else:
    raise ValueError(obj.shape)
  return [(cx + r_v * math.cos(obj.angle + 2 * math.pi * i / count),
           cy + r_v * math.sin(obj.angle + 2 * math.pi * i / count)) for i in range(count)]


def object_box(obj: DemoObject) -> np.ndarray:
  """Tight normalized (x0, y0, x1, y1) of the drawn object."""
  if obj.shape == "circle":
    r = obj.size / 2
    box = [obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r]
  else:
    pts = np.asarray(_polygon(obj, 1.0))
    box = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
  return np.clip(np.asarray(box, np.float32), 0.0, 1.0)


def render(scene: DemoScene, image_size: int = 64) -> np.ndarray:
  """uint8 [S, S, 3]: the scene drawn at SUPERSAMPLE x resolution, box-downsampled, + noise."""
  big = image_size * SUPERSAMPLE
  yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / max(image_size - 1, 1)
  bg = np.asarray(scene.bg_rgb, np.float32) + (scene.gradient[0] * (xx - 0.5)
                                               + scene.gradient[1] * (yy - 0.5))[..., None]
  canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).resize((big, big), Image.NEAREST)
  draw = ImageDraw.Draw(canvas)
  for obj in reversed(scene.objects):  # primary drawn last: never hidden
    if obj.shape == "circle":
      r = obj.size * big / 2
      cx, cy = obj.cx * big, obj.cy * big
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.rgb)
    else:
      draw.polygon(_polygon(obj, big), fill=obj.rgb)
  small = np.asarray(canvas.resize((image_size, image_size), Image.BOX), np.float32)
  noise = np.random.default_rng(scene.noise_seed).normal(0, 4.0, size=small.shape)
  return np.clip(small + noise, 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- captions


def position_word(obj: DemoObject) -> str:
  """"top left", "center", ... from the object's centre on a 3 x 3 grid."""
  row = min(int(obj.cy * 3), 2)
  col = min(int(obj.cx * 3), 2)
  return POSITIONS[row][col]


def _article(phrase: str) -> str:
  return "an" if phrase[0] in "aeiou" else "a"


def _a(phrase: str) -> str:
  return f"{_article(phrase)} {phrase}"


def _in_position(pos: str) -> str:
  return "in the center" if pos == "center" else f"in the {pos}"


def short_caption(scene: DemoScene) -> str:
  return f"{_a(scene.objects[0].name)}."


def caption(scene: DemoScene, rng: np.random.Generator) -> str:
  """One short caption about the primary object from several templates."""
  p, others = scene.objects[0], scene.objects[1:]
  size = "large" if p.size > 0.44 else "big"
  choices = [
      lambda: f"a photo of {_a(p.name)}.",
      lambda: f"{_a(p.name)} {_in_position(position_word(p))}.",
      lambda: f"{_a(size + ' ' + p.name)} on {_a(scene.background)} background.",
      lambda: f"a drawing of {_a(p.name)} {_in_position(position_word(p))}.",
      lambda: f"a picture of {_a(p.name)}.",
  ]
  if others:
    choices += [
        lambda: f"{_a(p.name)} next to a small {others[0].name}.",
        lambda: f"{_a(size + ' ' + p.name)} and " + " and ".join(
            f"a small {o.name}" for o in others) + ".",
    ]
  return choices[int(rng.integers(len(choices)))]()


_PREAMBLE = (
    "This is a simple synthetic picture that was rendered by a computer program rather than "
    "taken with a camera.",
    "It belongs to a small collection of generated images that are used to test and "
    "demonstrate how well vision and language models can read detailed descriptions.",
    "Every picture in the collection follows the same recipe: a plain square canvas, a softly "
    "shaded background with a little grain, and a few flat geometric shapes drawn on top.",
    "The shapes have clean edges, solid colours and no texture, shadows or outlines, and they "
    "do not overlap much, so each of them is easy to see.",
    "The description below first explains the general setting and then lists the shapes one "
    "by one, with their colours, their sizes and where they are placed.",
)


def long_caption(scene: DemoScene, rng: np.random.Generator) -> str:
  """Short caption + generic preamble (> 77 CLIP tokens) + the scene's distinguishing details."""
  p, others = scene.objects[0], scene.objects[1:]
  order = rng.permutation(len(_PREAMBLE) - 1)  # last sentence stays last
  preamble = " ".join([_PREAMBLE[i] for i in order] + [_PREAMBLE[-1]])
  details = [f"The background is {scene.background}.",
             f"The largest shape is {_a(p.name)}, placed {_in_position(position_word(p))} "
             f"of the picture."]
  if not others:
    details.append("There are no other shapes in the picture.")
  for k, o in enumerate(others):
    word = "second" if k == 0 else "third"
    details.append(f"The {word} shape is a smaller {o.name}, {_in_position(position_word(o))}.")
  return " ".join([short_caption(scene), preamble] + details)


def detail_caption(scene: DemoScene) -> str:
  """The long caption's details in other words, without its generic preamble: every shape with
  its position and the background (a second description of the same image)."""
  p, others = scene.objects[0], scene.objects[1:]
  parts = [f"{_a(p.name)} {_in_position(position_word(p))}"]
  parts += [f"a small {o.name} {_in_position(position_word(o))}" for o in others]
  listed = parts[0] if not others else ", ".join(parts[:-1]) + " and " + parts[-1]
  return f"On {_a(scene.background)} background: {listed}."


def captions_ml(scene: DemoScene, template_index: int) -> dict[str, str]:
  """{lang: caption}: template `template_index` filled with the primary class in each language."""
  p = scene.objects[0]
  out = {}
  for lang in LANGUAGES:
    tpls = _ML_TEMPLATES[lang]
    phrase = _class_phrase(lang, p.color, p.shape)
    out[lang] = tpls[template_index % len(tpls)].format(_a(phrase) if lang == "en" else phrase)
  return out


# ----------------------------------------------------------------------------- samples / sources


def make_sample(split_seed: int, index: int, image_size: int = 64) -> dict:
  """The full annotated sample `index` of a split (see the module docstring for the fields)."""
  scene = sample_scene(split_seed, index)
  rng = _rng(split_seed, index, stream=1)
  objs = scene.objects
  return {
      "image": render(scene, image_size),
      "caption": caption(scene, rng),
      "short_caption": short_caption(scene),
      "long_caption": long_caption(scene, rng),
      "detail_caption": detail_caption(scene),
      "label": objs[0].label,
      "boxes": np.stack([object_box(o) for o in objs]).astype(np.float32),
      "region_captions": [_a(o.name) for o in objs],
      "region_labels": np.asarray([o.label for o in objs], np.int32),
      "captions_ml": captions_ml(scene, int(rng.integers(len(_ML_TEMPLATES["en"])))),
      "key": f"demo{split_seed}_{index:08d}",
  }


class DemoSource:
  """A grain RandomAccessDataSource of `size` demo samples of one split (rendered on access)."""

  def __init__(self, size: int, split: str | int = "train", image_size: int = 64):
    if int(size) < 1:
      raise ValueError(f"demo data size must be >= 1, got {size}")
    if isinstance(split, str) and split not in SPLIT_SEEDS:
      raise ValueError(f"unknown demo split {split!r}; known: {', '.join(SPLIT_SEEDS)}")
    self.size = int(size)
    self.split_seed = SPLIT_SEEDS[split] if isinstance(split, str) else int(split)
    self.image_size = int(image_size)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"demo index {index} out of range [0, {self.size})")
    return make_sample(self.split_seed, index, self.image_size)

  def __repr__(self) -> str:
    return f"DemoSource(size={self.size}, split_seed={self.split_seed}, image_size={self.image_size})"


def samples(size: int, split: str = "train", image_size: int = 64) -> list[dict]:
  """The first `size` samples of a split as a list (for writers, eval sets, notebooks)."""
  src = DemoSource(size, split, image_size)
  return [src[i] for i in range(size)]


def zero_shot_arrays(size: int, image_size: int = 64, split: str = "zeroshot",
                     lang: str = "en") -> dict:
  """uint8 images [N, S, S, 3], labels [N], class names and templates of a held-out split."""
  src = DemoSource(size, split, image_size)
  items = [src[i] for i in range(size)]
  return {"images": np.stack([s["image"] for s in items]),
          "labels": np.asarray([s["label"] for s in items], np.int32),
          "class_names": class_names(lang), "templates": templates(lang)}

"""Text lines rendered with Pillow, preprocessed as rapidocr does, with their strings.

Each line is a short string (words, numbers, codes, punctuation) drawn in black-ish on white
with a system TrueType font (DejaVu on most Linux systems; Pillow's built-in font otherwise),
at a random size, with position jitter, a slight rotation, blur and noise. It is then resized
to height 48 keeping its aspect ratio (width capped at 320) and right-padded to 3x48x320, with
rapidocr's normalisation ``(x/255 - 0.5) / 0.5`` and padding value 0. Everything is decided by
a seeded numpy Generator, so the same seed gives the same lines, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ppocr.model import HEIGHT, WIDTH

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"))
# Fonts that are not for running text.
FONT_SKIP = ("ExtraLight", "Math", "Symbol", "Emoji", "Braille")

WORDS = """
the of and to in is for on with as by at from that this be are or was it not an have
all new more can will one about your time page free other which but out also any may
price total date name order number item account service report code model version
data system value amount invoice address phone email street city state office center
north south east west open close start stop quick brown fox jumps over lazy dog river
market bank paper water light green blue black white red yellow table chair window
door house school music video image text line word letter print store shop coffee
tea bread milk sugar salt lemon apple orange station train ticket gate platform hotel
room floor level exit entrance parking monday tuesday friday sunday january march july
october december morning evening night today Tokyo London Paris Berlin Madrid Boston
Chicago Dallas Denver Seattle Sydney Toronto Oslo Vienna Prague Dublin Austin Zurich
""".split()
PUNCT = ".,:;!?-/()'\"&%#@+*=$"
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"
MAX_RATIO = WIDTH / HEIGHT * 1.1  # lines much wider than 320/48 get squeezed by the resize


def find_fonts() -> list[Path]:
    """Regular-text TrueType/OpenType fonts installed on this system, sorted by path."""
    fonts: list[Path] = []
    for folder in FONT_DIRS:
        root = Path(folder)
        if root.is_dir():
            fonts.extend(
                p
                for p in root.rglob("*")
                if p.suffix.lower() in (".ttf", ".otf") and not any(s in p.name for s in FONT_SKIP)
            )
    return sorted(set(fonts))


def _word(rng: np.random.Generator) -> str:
    word = str(rng.choice(WORDS))
    style = rng.random()
    if style < 0.15:
        return word.upper()
    if style < 0.35:
        return word.capitalize()
    return word


def _number(rng: np.random.Generator) -> str:
    kind = int(rng.integers(6))
    if kind == 0:
        return str(int(rng.integers(0, 100000)))
    if kind == 1:
        return f"{rng.integers(0, 10000)}.{rng.integers(0, 100):02d}"
    if kind == 2:
        return f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind == 3:
        return f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    if kind == 4:
        return f"${rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
    return f"{rng.integers(0, 101)}%"


def _code(rng: np.random.Generator) -> str:
    alphabet = LETTERS[26:] + DIGITS
    parts = [
        "".join(rng.choice(list(alphabet), size=int(rng.integers(2, 5))))
        for _ in range(int(rng.integers(1, 4)))
    ]
    return str(rng.choice(["-", "/", ".", ""])).join(parts)


def _random_chars(rng: np.random.Generator) -> str:
    pool = LETTERS + DIGITS + PUNCT
    return "".join(rng.choice(list(pool), size=int(rng.integers(4, 13))))


def random_text(rng: np.random.Generator) -> str:
    """A line of 1-6 tokens: words (most), numbers, codes, random characters, punctuation."""
    tokens: list[str] = []
    for _ in range(int(rng.integers(1, 7))):
        pick = rng.random()
        if pick < 0.55:
            token = _word(rng)
        elif pick < 0.75:
            token = _number(rng)
        elif pick < 0.87:
            token = _code(rng)
        else:
            token = _random_chars(rng)
        if rng.random() < 0.2:
            token += str(rng.choice(list(".,:;!?")))
        if rng.random() < 0.05:
            token = f"({token})"
        tokens.append(token)
    return " ".join(tokens)


def _load_font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(os.fspath(path), size=size)


def render_line(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, rng: np.random.Generator
) -> Image.Image:
    """Dark text on a light background, cropped with a small random margin; RGB."""
    left, top, right, bottom = font.getbbox(text)
    text_w, text_h = right - left, bottom - top
    margin_x = int(rng.integers(2, 12))
    margin_top, margin_bottom = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    size = (text_w + 2 * margin_x, text_h + margin_top + margin_bottom)
    background = int(rng.integers(215, 256))
    ink = int(rng.integers(0, 60))
    image = Image.new("L", size, background)
    ImageDraw.Draw(image).text((margin_x - left, margin_top - top), text, fill=ink, font=font)
    angle = float(rng.normal(0.0, 0.7))
    if abs(angle) > 0.2:
        image = image.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=background)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 0.9))))
    pixels = np.asarray(image, dtype=np.float32)
    sigma = float(rng.uniform(0.0, 8.0))
    if sigma > 0:
        pixels = pixels + rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "L").convert("RGB")


def preprocess(image: Image.Image) -> np.ndarray:
    """rapidocr's TextRecognizer.resize_norm_img for one line and max ratio 320/48."""
    w, h = image.size
    resized_w = min(WIDTH, int(math.ceil(HEIGHT * w / h)))
    resized = image.resize((resized_w, HEIGHT), Image.BILINEAR)
    chw = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    chw = (chw - 0.5) / 0.5
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :resized_w] = chw
    return out


def make_lines(
    count: int, seed: int, characters: set[str], fonts: list[Path]
) -> tuple[np.ndarray, list[str]]:
    """`count` preprocessed lines [count, 3, 48, 320] float32 and their strings."""
    rng = np.random.default_rng(seed)
    font_choices: list[Path | None] = list(fonts) or [None]
    x = np.zeros((count, 3, HEIGHT, WIDTH), dtype=np.float32)
    labels: list[str] = []
    for i in range(count):
        font_path = font_choices[int(rng.integers(len(font_choices)))]
        font = _load_font(font_path, int(rng.integers(28, 41)))
        text = random_text(rng)
        # Keep only characters the model knows, and lines that fit the 320 px width.
        text = "".join(c for c in text if c in characters).strip()
        while True:
            left, top, right, bottom = font.getbbox(text)
            if " " not in text or (right - left + 8) / (bottom - top + 8) <= MAX_RATIO:
                break
            text = text.rsplit(" ", 1)[0]
        if not text:
            text = "0"
        x[i] = preprocess(render_line(text, font, rng))
        labels.append(text)
        if (i + 1) % 250 == 0 or i + 1 == count:
            print(f"  rendered {i + 1}/{count} lines", file=sys.stderr, flush=True)
    return x, labels


def write_split(folder: Path, name: str, x: np.ndarray, labels: list[str]) -> Path:
    """`<name>.npz` (key "x", uncompressed so it streams fast) and `<name>.labels.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"{name}.npz"
    partial = folder / f"{name}.part.npz"
    np.savez(partial, x=x)
    partial.replace(npz)
    (folder / f"{name}.labels.json").write_text(json.dumps(labels, ensure_ascii=False, indent=0))
    return npz


def read_labels(npz: Path) -> list[str]:
    return json.loads(npz.with_name(npz.name.removesuffix(".npz") + ".labels.json").read_text())

"""Render known text into PNG images: the OCR samples at build time, and test images on demand.

    render-text --text "First line\\nSecond line" --out data/x.png [--width 1000] [--height 300]
    render-text --from samples.txt --out samples/      (one image per blank-line-separated paragraph)
"""

from __future__ import annotations

import argparse
import os
import sys

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def render(text: str, path: str, width: int, height: int, size: int) -> None:
    font = ImageFont.truetype(FONT, size)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    y = size
    for line in text.split("\n"):
        draw.text((size, y), line, font=font, fill=0)
        y += int(size * 1.6)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    image.save(path)


def paragraphs(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return [p.strip() for p in "\n".join(lines).split("\n\n") if p.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="render-text")
    parser.add_argument("--text", help="text to render; \\n starts a new line")
    parser.add_argument("--from", dest="source", help="a text file: one image per paragraph")
    parser.add_argument("--out", required=True, help="the image (with --text) or a folder (with --from)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=0, help="default: fits the text")
    parser.add_argument("--size", type=int, default=36, help="font size in pixels")
    args = parser.parse_args(argv)
    if args.text is None and args.source is None:
        parser.error("give --text or --from")
    if args.text is not None:
        texts = [args.text.replace("\\n", "\n")]
    else:
        with open(args.source, encoding="utf-8") as source:
            texts = paragraphs(source.read())
    for index, text in enumerate(texts, start=1):
        height = args.height or int(args.size * (2 + 1.6 * len(text.split("\n"))))
        path = args.out if args.text is not None else os.path.join(args.out, f"sample_{index}.png")
        render(text, path, args.width, height, args.size)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

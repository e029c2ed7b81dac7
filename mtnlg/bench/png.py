"""A tiny PNG bar-chart writer (no plotting library): grouped horizontal bars with text labels.

    chart = BarChart("mtnlg bench", width=720)
    chart.section("tokens/s, bf16")
    chart.bar("mtnlg", 512.0, "512 tok/s", color=0)
    chart.bar("HF peer", 240.0, "240 tok/s", color=1)
    chart.save("bench.png")

Text is drawn with a built-in 5x7 bitmap font (upper case, digits and a little punctuation).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# 5x7 glyphs: 7 rows of 5 bits, most significant bit on the left.
_FONT: dict[str, tuple[int, ...]] = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0), "=": (0, 0, 31, 0, 31, 0, 0),
    "/": (1, 1, 2, 4, 8, 16, 16), "%": (24, 25, 2, 4, 8, 19, 3), "(": (2, 4, 8, 8, 8, 4, 2),
    ")": (8, 4, 2, 2, 2, 4, 8), "x": (0, 0, 17, 10, 4, 10, 17), "_": (0, 0, 0, 0, 0, 0, 31),
    "*": (0, 4, 21, 14, 21, 4, 0), "<": (2, 4, 8, 16, 8, 4, 2), ">": (8, 4, 2, 1, 2, 4, 8),
}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 140, 140)]
SCALE = 2  # pixels per font dot


class Canvas:
    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h, max(y0, y1))
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = 3 * (y * self.w + x0)
            self.px[i: i + len(row)] = row

    def text(self, x: int, y: int, s: str, color=(0, 0, 0)) -> int:
        """Draw ``s`` with its top-left corner at (x, y); returns the x after the last glyph."""
        for ch in s:
            glyph = _FONT.get(ch, _FONT.get(ch.upper(), _FONT["*"]))
            for r, bits in enumerate(glyph):
                for c in range(5):
                    if bits & (16 >> c):
                        self.rect(x + c * SCALE, y + r * SCALE, x + (c + 1) * SCALE, y + (r + 1) * SCALE, color)
            x += 6 * SCALE
        return x

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w: 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body


def text_width(s: str) -> int:
    return 6 * SCALE * len(s)


class BarChart:
    """Sections of horizontal bars; each section scales its bars to its own largest value."""

    ROW, GAP, PAD = 22, 14, 12

    def __init__(self, title: str, width: int = 760):
        self.title, self.width = title, max(width, text_width(title) + 2 * self.PAD)
        self.sections: list[tuple[str, list[tuple[str, float, str, int]], float | None]] = []

    def section(self, title: str, max_value: float | None = None) -> None:
        self.sections.append((title, [], max_value))

    def bar(self, label: str, value: float, text: str, color: int = 0) -> None:
        self.sections[-1][1].append((label, float(value), text, color))

    def render(self) -> Canvas:
        rows = sum(len(b) for _, b, _ in self.sections)
        height = self.PAD * 2 + 24 + len(self.sections) * (self.ROW + self.GAP) + rows * self.ROW
        c = Canvas(self.width, height)
        y = self.PAD
        c.text(self.PAD, y, self.title)
        y += 24
        label_w = max([text_width(lbl) for _, bars, _ in self.sections for lbl, *_ in bars] + [0]) + 2 * self.PAD
        for title, bars, max_value in self.sections:
            y += self.GAP
            c.text(self.PAD, y + 4, title, (60, 60, 60))
            y += self.ROW
            top = max_value or max([v for _, v, _, _ in bars] + [1e-12])
            avail = self.width - label_w - self.PAD - max([text_width(t) for *_, t, _ in bars] + [0]) - 8
            for label, value, text, color in bars:
                c.text(self.PAD, y + 4, label)
                end = label_w + int(max(avail, 10) * max(value, 0.0) / top)
                c.rect(label_w, y + 2, end, y + self.ROW - 4, PALETTE[color % len(PALETTE)])
                c.text(end + 6, y + 4, text)
                y += self.ROW
        return c

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.render().png())
        return path

"""Kivy widgets of the bedside screen: live image, instruction icon, quality meter, capture strip.

Imported only by `edge_app.ui.app` (after the window is configured), never by the engine.
Icons are drawn with canvas primitives in a 100 x 100 design square (y up) scaled to the widget.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from kivy.core.text import Label as CoreLabel
from kivy.graphics import Color, Ellipse, Line, Rectangle, RoundedRectangle, Triangle
from kivy.graphics.texture import Texture
from kivy.metrics import dp, sp
from kivy.properties import BooleanProperty, NumericProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.label import Label
from kivy.uix.widget import Widget

from edge_app.ui.display import COLORS, ICON_CAPTURED, ICON_SEARCHING, ICON_UNAVAILABLE, capture_label


def gray_texture(image: np.ndarray) -> Texture:
    """A new luminance texture for a uint8 [H, W] image, rows top to bottom."""
    h, w = image.shape
    tex = Texture.create(size=(w, h), colorfmt="luminance")
    tex.flip_vertical()  # numpy row 0 is the top of the screen; GL's is the bottom
    tex.blit_buffer(np.ascontiguousarray(image).tobytes(), colorfmt="luminance", bufferfmt="ubyte")
    return tex


def text_texture(text: str, font_size: float, bold: bool = True) -> Texture:
    """Render a short text once into a texture for use in a canvas."""
    label = CoreLabel(text=text, font_size=font_size, bold=bold)
    label.refresh()
    return label.texture


class Panel(Widget):
    """A widget with a flat background colour (set `bg`)."""

    def __init__(self, bg=COLORS["panel"], **kwargs):
        super().__init__(**kwargs)
        with self.canvas.before:
            self._bg_color = Color(*bg)
            self._bg = Rectangle(pos=self.pos, size=self.size)
        self.bind(pos=self._sync_bg, size=self._sync_bg)

    def _sync_bg(self, *_):
        self._bg.pos, self._bg.size = self.pos, self.size


class PanelBox(BoxLayout):
    """A BoxLayout with a flat background colour."""

    def __init__(self, bg=COLORS["panel"], **kwargs):
        super().__init__(**kwargs)
        with self.canvas.before:
            self.bg_color = Color(*bg)
            self._bg = Rectangle(pos=self.pos, size=self.size)
        self.bind(pos=self._sync_bg, size=self._sync_bg)

    def _sync_bg(self, *_):
        self._bg.pos, self._bg.size = self.pos, self.size


class Banner(Label):
    """The instruction sentence in large text on a coloured band."""

    def __init__(self, **kwargs):
        kwargs.setdefault("font_size", sp(34))
        kwargs.setdefault("bold", True)
        kwargs.setdefault("halign", "center")
        kwargs.setdefault("valign", "middle")
        super().__init__(**kwargs)
        with self.canvas.before:
            self.bg_color = Color(*COLORS["panel"])
            self._bg = Rectangle(pos=self.pos, size=self.size)
        self.bind(pos=self._sync, size=self._sync)

    def _sync(self, *_):
        self._bg.pos, self._bg.size = self.pos, self.size
        self.text_size = (self.width - dp(24), self.height)
        self.font_size = self.fit_font_size(self.text, self.width - dp(24), self.height)

    @staticmethod
    def fit_font_size(text: str, width: float, height: float) -> float:
        """Largest of a few sizes at which `text` wraps into the band (bold Roboto: ~0.55 em/char)."""
        for size in (sp(34), sp(28), sp(24), sp(20)):
            per_line = max(int(width / (0.55 * size)), 1)
            lines = -(-len(text) // per_line)
            if lines * 1.25 * size <= height:
                return size
        return sp(18)

    def show(self, text: str, kind: str) -> None:
        """Set the sentence and the band colour for a Display.kind; long sentences get smaller text."""
        if text != self.text:
            self.font_size = self.fit_font_size(text, self.width - dp(24), self.height)
            self.text = text
        bg = {"guide": COLORS["panel"], "hold": COLORS["hold"], "captured": COLORS["hold"],
              "unavailable": COLORS["unavailable"], "searching": COLORS["panel"]}[kind]
        self.bg_color.rgba = bg
        self.color = (0.05, 0.05, 0.05, 1) if kind in ("hold", "captured", "unavailable") else COLORS["text"]


class LiveImage(Widget):
    """The live B-mode image, aspect-fit. One texture, updated in place with blit_buffer.

    A new texture is created only when the frame size changes (`texture_creations` counts them).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._tex: Texture | None = None
        self._shape: tuple[int, int] | None = None
        self.texture_creations = 0
        self.blits = 0
        with self.canvas:
            Color(0, 0, 0, 1)
            self._black = Rectangle(pos=self.pos, size=self.size)
            Color(1, 1, 1, 1)
            self._rect = Rectangle(pos=self.pos, size=(0, 0))
        self.bind(pos=self._layout, size=self._layout)

    def set_image(self, image: np.ndarray) -> None:
        """Show a uint8 [H, W] frame."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim != 2:
            raise ValueError(f"LiveImage needs a uint8 [H, W] image, got shape {image.shape}")
        if self._shape != image.shape:
            self._tex = gray_texture(image)
            self._shape = image.shape
            self.texture_creations += 1
            self._rect.texture = self._tex
            self._layout()
        else:
            self._tex.blit_buffer(image.tobytes(), colorfmt="luminance", bufferfmt="ubyte")
        self.blits += 1
        self.canvas.ask_update()

    def image_rect(self) -> tuple[float, float, float, float]:
        """(x, y, w, h) of the drawn image in window coordinates (0 size before the first frame)."""
        return (*self._rect.pos, *self._rect.size)

    def _layout(self, *_):
        self._black.pos, self._black.size = self.pos, self.size
        if self._shape is None:
            return
        h, w = self._shape
        scale = min(self.width / w, self.height / h)
        dw, dh = w * scale, h * scale
        self._rect.size = (dw, dh)
        self._rect.pos = (self.x + (self.width - dw) / 2, self.y + (self.height - dh) / 2)


class InstructionIcon(Widget):
    """The large instruction pictogram: arrow on a body, rotation arc, tilt/rock fan, hold hand.

    Set `icon` (an ACTIONS name or ICON_*), `caption` and `progress` with `show()`.
    """

    icon = StringProperty(ICON_UNAVAILABLE)
    caption = StringProperty("")
    progress = NumericProperty(0.0)  # hold icon: share of the hold time before auto-capture

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bind(pos=self.redraw, size=self.redraw)

    def show(self, icon: str, caption: str, progress: float = 0.0) -> None:
        """Set what to draw; redraws once, now, and only when something changed."""
        new = (icon, caption, round(float(progress), 2))
        if new != (self.icon, self.caption, round(float(self.progress), 2)):
            self.icon, self.caption, self.progress = new
            self.redraw()

    # design square -> window coordinates
    def _box(self):
        cap_h = dp(36)
        s = max(min(self.width, self.height - cap_h), 1)
        return self.x + (self.width - s) / 2, self.y + cap_h + (self.height - cap_h - s) / 2, s / 100.0

    def _p(self, x, y):
        x0, y0, u = self._box()
        return x0 + x * u, y0 + y * u

    def _pts(self, pts):
        out = []
        for x, y in pts:
            out.extend(self._p(x, y))
        return out

    def _arrow(self, pts, width=4.5, head=13.0):
        """Polyline in design units ending in an arrowhead at its last point."""
        u = self._box()[2]
        Line(points=self._pts(pts), width=width * u, cap="none", joint="round")
        (xa, ya), (xb, yb) = pts[-2], pts[-1]
        d = math.hypot(xb - xa, yb - ya) or 1.0
        dx, dy = (xb - xa) / d, (yb - ya) / d
        tip = (xb + dx * head, yb + dy * head)
        left = (xb - dy * head * 0.65, yb + dx * head * 0.65)
        right = (xb + dy * head * 0.65, yb - dx * head * 0.65)
        Triangle(points=self._pts([tip, left, right]))

    @staticmethod
    def _arc(cx, cy, r, a0_deg, a1_deg, step=4.0):
        n = max(int(abs(a1_deg - a0_deg) / step), 2)
        return [(cx + r * math.cos(math.radians(a0_deg + (a1_deg - a0_deg) * i / n)),
                 cy + r * math.sin(math.radians(a0_deg + (a1_deg - a0_deg) * i / n))) for i in range(n + 1)]

    def _text(self, text, x, y, size, color):
        tex = text_texture(text, size)
        Color(*color)
        px, py = self._p(x, y)
        Rectangle(texture=tex, pos=(px - tex.width / 2, py - tex.height / 2), size=tex.size)

    def redraw(self, *_):
        """Redraw the pictogram (only when icon, caption, progress or geometry change)."""
        self.canvas.clear()
        u = self._box()[2]
        with self.canvas:
            Color(0, 0, 0, 0.62)
            RoundedRectangle(pos=self.pos, size=self.size, radius=[dp(14)])
            draw = {ICON_UNAVAILABLE: self._draw_unavailable, ICON_SEARCHING: self._draw_searching,
                    ICON_CAPTURED: self._draw_captured, "HOLD": self._draw_hold}.get(self.icon)
            kind = self.icon.split("_")[0]
            if draw is not None:
                draw(u)
            elif kind == "SLIDE":
                self._draw_slide(u)
            elif kind == "ROTATE":
                self._draw_rotate(u)
            elif kind in ("TILT", "ROCK"):
                self._draw_fan(u, kind)
            if self.caption:
                tex = text_texture(self.caption, sp(22))
                color = {ICON_UNAVAILABLE: COLORS["unavailable"], "HOLD": COLORS["hold"],
                         ICON_CAPTURED: COLORS["hold"]}.get(self.icon, COLORS["text"])
                Color(*color)
                Rectangle(texture=tex, pos=(self.center_x - tex.width / 2, self.y + dp(8)), size=tex.size)

    def _draw_slide(self, u):
        muted = COLORS["muted"]
        Color(*muted)
        Line(circle=(*self._p(50, 86), 9 * u), width=2.2 * u)                       # head
        x, y = self._p(31, 12)
        Line(rounded_rectangle=(x, y, 38 * u, 62 * u, 10 * u), width=2.2 * u)     # torso
        Line(points=self._pts([(31, 66), (16, 36)]), width=2.2 * u, cap="round")  # arms
        Line(points=self._pts([(69, 66), (84, 36)]), width=2.2 * u, cap="round")
        # Patient seen from the front: the patient's right is on the screen's left.
        self._text("R", 10, 88, sp(26), muted)
        self._text("L", 90, 88, sp(26), muted)
        sx, sy = 50, 46  # the probe, mid-chest: the arrow shows a direction, not a place
        direction = {"SLIDE_HEAD": (0, 1), "SLIDE_FEET": (0, -1), "SLIDE_LEFT": (1, 0),
                     "SLIDE_RIGHT": (-1, 0)}[self.icon]
        # as long as possible up to 26 units, with the arrowhead (13 units) inside the square
        room = {(0, 1): 97 - sy, (0, -1): sy - 3, (1, 0): 97 - sx, (-1, 0): sx - 3}[direction]
        length = max(min(26, room - 13), 8)
        Color(*COLORS["arrow"])
        self._arrow([(sx, sy), (sx + direction[0] * length, sy + direction[1] * length)], width=5.0, head=13)
        Color(*COLORS["marker"])
        Ellipse(pos=self._p(sx - 5, sy - 5), size=(10 * u, 10 * u))                # the probe

    def _draw_rotate(self, u):
        Color(*COLORS["muted"])
        x, y = self._p(34, 43)
        RoundedRectangle(pos=(x, y), size=(32 * u, 14 * u), radius=[4 * u])       # probe seen from behind
        Color(*COLORS["marker"])
        Ellipse(pos=self._p(68, 46), size=(8 * u, 8 * u))                         # index marker
        Color(*COLORS["arrow"])
        # Clockwise as the operator sees the probe from behind (from above the patient).
        sweep = -290 if self.icon == "ROTATE_CW" else 290
        self._arrow(self._arc(50, 50, 36, 120, 120 + sweep), width=5.0, head=12)

    def _draw_fan(self, u, kind):
        """Probe from the side with its beam: tilt shows the beam edge-on, rock the sector face-on."""
        toward_marker = self.icon.endswith("MARKER")
        sign = -1 if toward_marker else 1   # marker side = screen right -> beam swings right
        apex = (50, 66)
        Color(*COLORS["muted"])
        x, y = self._p(43, 66)
        RoundedRectangle(pos=(x, y), size=(14 * u, 26 * u), radius=[4 * u])       # probe handle
        Color(*COLORS["marker"])
        Ellipse(pos=self._p(58, 82), size=(7 * u, 7 * u))                         # marker side
        half = 4 if kind == "TILT" else 32                                         # edge-on vs face-on
        swing = 26 if kind == "TILT" else 20
        for angle, color in ((-90, (0.5, 0.5, 0.5, 0.9)), (-90 - sign * swing, COLORS["arrow"])):
            Color(*color)
            rim = self._arc(*apex, 52, angle - half, angle + half, step=3)
            Line(points=self._pts([apex, *rim, apex]), width=2.0 * u, joint="round")
        Color(*COLORS["arrow"])
        self._arrow(self._arc(*apex, 60, -90 + sign * 4, -90 - sign * (swing - 2)), width=4.5, head=10)
        self._text("side view" if kind == "TILT" else "face view", 18, 95, sp(15), COLORS["muted"])

    def _draw_hold(self, u):
        Color(*COLORS["hold"])
        Line(circle=(*self._p(50, 50), 42 * u), width=4.5 * u)
        if self.progress > 0:  # the auto-capture countdown fills the ring clockwise, in white
            Color(*COLORS["text"])
            Line(points=self._pts(self._arc(50, 50, 42, 90, 90 - 360 * min(self.progress, 1.0))),
                 width=4.5 * u, cap="round")
            Color(*COLORS["hold"])
        x, y = self._p(35, 22)
        RoundedRectangle(pos=(x, y), size=(30 * u, 30 * u), radius=[8 * u])      # palm
        for fx, top in ((38.5, 70), (46, 75), (53.5, 75), (61, 70)):               # fingers
            Line(points=self._pts([(fx, 44), (fx, top)]), width=3.4 * u, cap="round")
        Line(points=self._pts([(37, 36), (25, 52)]), width=3.6 * u, cap="round")  # thumb

    def _draw_captured(self, u):
        Color(*COLORS["hold"])
        Line(circle=(*self._p(50, 50), 42 * u), width=4.5 * u)
        Line(points=self._pts([(28, 52), (44, 34), (73, 68)]), width=7 * u, joint="round", cap="round")

    def _draw_unavailable(self, u):
        Color(*COLORS["unavailable"])
        Line(points=self._pts([(50, 92), (8, 14), (92, 14)]), width=5 * u, close=True, joint="round")
        Line(points=self._pts([(50, 70), (50, 40)]), width=6 * u, cap="round")
        Ellipse(pos=self._p(44.5, 22), size=(11 * u, 11 * u))

    def _draw_searching(self, u):
        Color(*COLORS["searching"])
        Line(circle=(*self._p(44, 58), 22 * u), width=4.5 * u)
        Line(points=self._pts([(60, 42), (80, 20)]), width=7 * u, cap="round")


class QualityMeter(Widget):
    """Vertical bar 0..1 with the capture level marked; red below it, green at or above."""

    quality = NumericProperty(0.0)
    threshold = NumericProperty(0.6)
    active = BooleanProperty(True)  # False while guidance is unavailable: the bar turns grey
    title = StringProperty("Quality")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.canvas:
            Color(0.22, 0.24, 0.28, 1)
            self._track = Rectangle()
            self._fill_color = Color(*COLORS["quality_low"])
            self._fill = Rectangle()
            Color(*COLORS["threshold"])
            self._tick = Line(width=dp(2.5))
            self._tick_label = Rectangle()
        self._value = Label(font_size=sp(30), bold=True, size_hint=(None, None))
        self._title = Label(text="Quality", font_size=sp(20), color=COLORS["muted"], size_hint=(None, None))
        self.add_widget(self._value)
        self.add_widget(self._title)
        self._tick_tex = text_texture("capture", sp(16), bold=False)
        self._tick_label.texture = self._tick_tex
        self.bind(pos=self._redraw, size=self._redraw, quality=self._redraw, threshold=self._redraw,
                  active=self._redraw, title=self._redraw)

    def bar_rect(self) -> tuple[float, float, float, float]:
        """(x, y, w, h) of the bar's track in window coordinates."""
        w = min(dp(56), self.width * 0.35)
        top_pad, bottom_pad = dp(40), dp(48)
        return (self.x + dp(16), self.y + bottom_pad, w,
                max(self.height - top_pad - bottom_pad, 1))

    def _redraw(self, *_):
        x, y, w, h = self.bar_rect()
        q = min(max(float(self.quality), 0.0), 1.0)
        self._track.pos, self._track.size = (x, y), (w, h)
        self._fill.pos, self._fill.size = (x, y), (w, h * q)
        ok = q >= self.threshold
        self._fill_color.rgba = (COLORS["muted"] if not self.active else
                                 COLORS["quality_ok"] if ok else COLORS["quality_low"])
        ty = y + h * self.threshold
        self._tick.points = [x - dp(10), ty, x + w + dp(10), ty]
        self._tick_label.pos = (x + w + dp(12), ty - self._tick_tex.height / 2)
        self._tick_label.size = self._tick_tex.size
        self._value.text = f"{q:.2f}"
        self._value.color = COLORS["quality_ok"] if ok and self.active else COLORS["text"]
        label_w = w + dp(60)  # centred over the bar
        self._value.size = (label_w, dp(40))
        self._value.pos = (x + w / 2 - label_w / 2, self.y + dp(4))
        self._title.text = self.title
        self._title.size = (self.width, dp(32))
        self._title.pos = (self.x, self.top - dp(36))


class CaptureStrip(BoxLayout):
    """The captured clips, newest on top: a thumbnail and "VIEW  q 0.72" per capture."""

    def __init__(self, **kwargs):
        kwargs.setdefault("orientation", "vertical")
        kwargs.setdefault("spacing", dp(6))
        kwargs.setdefault("size_hint_y", None)
        super().__init__(**kwargs)
        self.bind(minimum_height=self.setter("height"))
        self.count = 0
        self._empty = Label(text="No clips captured yet", color=COLORS["muted"], font_size=sp(17),
                            size_hint_y=None, height=dp(40))
        self.add_widget(self._empty)

    def add_capture(self, capture: Any, image: np.ndarray | None, threshold: float = 0.6, max_tiles: int = 12) -> None:
        """Put one tile on top; its thumbnail texture is made once from the frame on screen.

        Args:
            capture: the engine's Capture (view, quality: green when >= threshold, how it was taken).
            image: the frame on screen (thumbnail) or None.
            threshold: diagnostic quality threshold.
            max_tiles: older tiles beyond this are dropped from the strip.
        """
        if self._empty.parent is not None:
            self.remove_widget(self._empty)
        self.count += 1
        tile = BoxLayout(orientation="horizontal", size_hint_y=None, height=dp(60), spacing=dp(10))
        thumb = Widget(size_hint_x=None, width=dp(60))
        if image is not None:
            step = max(1, max(image.shape) // 96)
            tex = gray_texture(np.ascontiguousarray(image[::step, ::step]))
            with thumb.canvas:
                Color(1, 1, 1, 1)
                rect = Rectangle(texture=tex)

            def place(w, *_):
                side = min(w.width, w.height)
                rect.pos, rect.size = (w.x, w.y + (w.height - side) / 2), (side, side)
            thumb.bind(pos=place, size=place)
        tile.add_widget(thumb)
        text = Label(text=capture_label(capture), markup=True, font_size=sp(20),
                     color=COLORS["hold"] if float(getattr(capture, "quality", 0.0)) >= threshold else COLORS["text"],
                     halign="left", valign="middle")
        text.bind(size=lambda w, sz: setattr(w, "text_size", sz))
        tile.add_widget(text)
        self.add_widget(tile, index=len(self.children))  # display order is reversed: this is the top
        while len(self.children) > max_tiles:
            self.remove_widget(self.children[0])  # the oldest, at the bottom

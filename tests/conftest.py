"""Shared pytest setup. Area-specific helpers live in tests/helpers_<area>.py, not here."""
import os

os.environ.setdefault("KIVY_NO_ARGS", "1")
os.environ.setdefault("KIVY_NO_CONSOLELOG", "1")

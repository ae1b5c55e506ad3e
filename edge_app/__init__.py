"""The bedside runtime: guidance engine (no Kivy, no torch), Kivy UI, headless and replay modes."""

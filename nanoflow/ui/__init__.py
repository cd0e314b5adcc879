"""Gradio chat page (``nanoflow chat``) on an in-process AsyncEngine; needs the ``ui`` extra (gradio)."""

"""The model and its maths (chapters 1-4): attention, positional encodings, layers, the GPT and
encoder-decoder models, optimisers and input checks. Pure NumPy: this package imports nothing
else of the course and never MPI (tests/test_layering.py enforces it)."""

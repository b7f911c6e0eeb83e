"""Measuring and predicting (chapters 0, 5, 9-14): hardware peaks, timing, the cost model (one
home per formula), the chapter-13 planner and the FAQ's experiments. No MPI."""

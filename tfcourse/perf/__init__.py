"""Measuring and predicting (chapters 0, 5, 9-13): hardware peaks, timing, the cost model (one
home per formula), the chapter-12 planner and the FAQ's experiments. No MPI."""

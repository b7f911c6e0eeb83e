"""What the explorers and plots show is computed by pure functions: check those."""

import math
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tfcourse.course import viz, widgets  # noqa: E402


def test_explorer_weights_match_hand_computed_softmax():
    n, d_k, temperature = 5, 16, 2.0
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((n, d_k)), rng.standard_normal((n, d_k))
    expected = np.zeros((n, n))
    for i in range(n):
        logits = [sum(q[i, c] * k[j, c] for c in range(d_k)) / math.sqrt(d_k) / temperature
                  for j in range(i + 1)]
        z = sum(math.exp(x) for x in logits)
        expected[i, : i + 1] = [math.exp(x) / z for x in logits]
    got = widgets.explorer_attention_weights(d_k, temperature, scaled=True, causal=True, n=n)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_unscaled_large_d_k_saturates():
    scaled = widgets.explorer_attention_weights(512, 1.0, scaled=True, causal=False)
    unscaled = widgets.explorer_attention_weights(512, 1.0, scaled=False, causal=False)
    assert unscaled.max(axis=-1).mean() > 0.9 > 0.5 > scaled.max(axis=-1).mean()


def test_positional_rows_shape():
    assert widgets.explorer_positional_rows(10, max_len=7).shape == (7, 10)


def test_explorers_build_widgets():
    pytest.importorskip("ipywidgets")
    import matplotlib.pyplot as plt

    for build in (widgets.attention_explorer, widgets.positional_explorer):
        interactive = build()
        assert callable(interactive)
        plt.close("all")


def test_heatmap_draws_the_given_matrix():
    matrix = np.arange(6.0).reshape(2, 3)
    ax = viz.plot_heatmap(matrix, xticklabels=["a", "b", "c"])
    np.testing.assert_array_equal(ax.images[0].get_array(), matrix)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_heatmap_rejects_non_2d():
    with pytest.raises(ValueError, match="matrix"):
        viz.plot_heatmap(np.zeros(3))


def test_roofline_plot_has_the_roof():
    ax = viz.plot_roofline(100.0, 10.0, [("p", 1.0, 5.0)])
    x, y = ax.lines[0].get_data()
    np.testing.assert_allclose(y, np.minimum(100.0, 10.0 * x))


@pytest.mark.parametrize("schedule_name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(1, 1), (2, 4), (4, 1), (4, 8), (3, 5)])
def test_simulated_bubble_equals_the_formula(schedule_name, p, m):
    """With uniform stages, both schedules idle exactly (p-1)/(m+p-1) of the time."""
    events, simulated, formula = widgets.explorer_pipeline(schedule_name, p, m)
    assert simulated == pytest.approx(formula)
    assert len(events) == p and all(len(stage) == 2 * m for stage in events)


def test_bubble_explorer_builds():
    import matplotlib.pyplot as plt

    assert callable(widgets.bubble_explorer())
    plt.close("all")


def test_pipeline_timeline_draws_one_bar_per_event():
    events = [[{"kind": "forward", "microbatch": 0, "start": 0.0, "end": 1.0},
               {"kind": "backward", "microbatch": 0, "start": 2.0, "end": 4.0}],
              [{"kind": "forward", "microbatch": 0, "start": 1.0, "end": 2.0}]]
    ax = viz.plot_pipeline_timeline(events, scale=1.0)
    widths = sorted(round(patch.get_width(), 6) for patch in ax.patches)
    assert widths == [1.0, 1.0, 2.0]


def test_step_parts_stack_to_each_rank_step_time():
    parts = [{"compute": 0.010, "communication": 0.002, "waiting": 0.003},
             {"compute": 0.008, "communication": 0.004, "waiting": 0.0}]
    ax = viz.plot_step_parts(parts, title="DP 2")
    bars = ax.patches
    assert len(bars) == 6  # 3 parts x 2 ranks
    for rank, expected_ms in enumerate((15.0, 12.0)):
        rank_bars = [b for b in bars if abs(b.get_x() + b.get_width() / 2 - rank) < 1e-9]
        top = max(b.get_y() + b.get_height() for b in rank_bars)
        assert top == pytest.approx(expected_ms)
    matplotlib.pyplot.close("all")


def test_plan_explorer_lists_fitting_layouts_once_each():
    lines = widgets.explorer_plans("GPT-3 175B", 1024, 80.0, 25.0, top=4)
    total, rejected = (int(n) for n in re.fullmatch(r"(\d+) plans, (\d+) do not fit in 80 GB",
                                                     lines[0]).groups())
    assert 0 < rejected < total
    layouts = [line.split(" ZeRO")[0] for line in lines[1:]]
    assert len(layouts) == 4 and len(set(layouts)) == 4
    assert all("tp=" in line and "days for 300B tokens" in line for line in lines[1:])
    # less memory per device can only remove plans
    assert int(widgets.explorer_plans("GPT-3 175B", 1024, 40.0, 25.0)[0].split()[2]) >= rejected
    with pytest.raises(ValueError, match=r"model_name: expected one of .*got 'GPT-4'"):
        widgets.explorer_plans("GPT-4", 1024, 80.0, 25.0)


def test_planner_explorer_builds():
    import matplotlib.pyplot as plt

    assert callable(widgets.planner_explorer())
    plt.close("all")


def test_memory_calculator_counts_gpt3_by_hand():
    # GPT-3 175B has 175.2e9 parameters (untied head): fp32 on one device, 4 bytes each
    one = widgets.explorer_memory("GPT-3 175B", 1, 1, 1, 0, "none", "fp32")
    assert one["parameters"] == pytest.approx(4 * 175.2e9 / 1e9, rel=1e-3)
    assert one["optimizer"] == pytest.approx(2 * one["parameters"])
    # bf16 ZeRO-3 over dp 64, tp 8: 2-byte weights split 512 ways, 12 bytes of optimizer 512
    sharded = widgets.explorer_memory("GPT-3 175B", 64, 8, 1, 3, "full", "bf16")
    assert sharded["parameters"] == pytest.approx(2 * 175.2e9 / 512 / 1e9, rel=1e-3)
    assert sharded["optimizer"] == pytest.approx(6 * sharded["parameters"])
    full, none = (widgets.explorer_memory("GPT-3 175B", 8, 8, 16, 1, r, "bf16")["activations"]
                  for r in ("full", "none"))
    assert full < none / 10
    with pytest.raises(ValueError, match="precision: expected one of"):
        widgets.explorer_memory("GPT-3 175B", 1, 1, 1, 0, "none", "fp64")
    with pytest.raises(ValueError, match="dp, pp: expected"):
        widgets.explorer_memory("GPT-3 175B", 1, 1, 5, 0, "none", "bf16")


def test_memory_explorer_builds():
    assert callable(widgets.memory_explorer())

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
    assert formula == pytest.approx((p - 1) / (m + p - 1))
    assert len(events) == p and all(len(stage) == 2 * m for stage in events)


def test_explorer_pipeline_keeps_chapter_7s_call():
    """notebooks/07_model_parallel.ipynb: explorer_pipeline(name, p=4, m=6) for GPipe and
    1F1B, idle a third of the time (3 slots of 9) at the default costs (forward 1, backward 2)."""
    for name in ("gpipe", "1f1b"):
        events, simulated, formula = widgets.explorer_pipeline(name, p=4, m=6)
        assert simulated == pytest.approx(3 / 9) and formula == pytest.approx(3 / 9)
        assert max(e["end"] for stage in events for e in stage) == pytest.approx(9 * 3.0)


def test_four_schedules_side_by_side_equal_costs_by_hand():
    """p = 4, m = 8, v = 2, F = B = W = 1: GPipe and 1F1B idle 3 of 11 slots, interleaved 3
    of 2 * 8 + 3 half-slots, ZB-H1 (p - 1)(T_F + T_B - T_W) = 3 of 8 * 3 + 3 time units."""
    shown = widgets.explorer_pipelines(4, 8, v=2, forward_cost=1.0, input_cost=1.0,
                                       weight_cost=1.0)
    assert list(shown) == ["gpipe", "1f1b", "interleaved", "zb-h1"]
    expected = {"gpipe": 3 / 11, "1f1b": 3 / 11, "interleaved": 3 / 19, "zb-h1": 3 / 27}
    for name, bubble in expected.items():
        assert shown[name]["simulated"] == pytest.approx(bubble, rel=1e-12), name
        assert shown[name]["formula"] == pytest.approx(bubble, rel=1e-12), name
        assert f"{bubble:.1%} simulated, {bubble:.1%} by" in shown[name]["title"], name
    ops_per_stage = {"gpipe": 16, "1f1b": 16, "interleaved": 32, "zb-h1": 24}  # F B (W) each
    for name, count in ops_per_stage.items():
        assert [len(stage) for stage in shown[name]["events"]] == [count] * 4, name
    assert "(p-1)/(vm+p-1)" in shown["interleaved"]["title"]
    # every stage does the same work: m (F + B + W) = 24 time units
    for name in expected:
        for stage in shown[name]["events"]:
            assert sum(e["end"] - e["start"] for e in stage) == pytest.approx(24.0), name


def test_four_schedules_unequal_costs_by_hand():
    """p = 2, m = 2, F = 1, B = 1, W = 2 (a whole backward of 3). GPipe and 1F1B: 1 slot of
    3, makespan 3 * 4 = 12, bubble 1/3. Interleaved (v = 2, half-chunks of F 0.5 and backward
    1.5): 1 half-slot of 2 * 2 + 1, bubble 1/5. ZB-H1 by hand: stage 1 F0 1-2, B0 2-3, F1 3-4,
    B1 4-5, W0 5-7, W1 7-9; stage 0 F0 0-1, F1 1-2, B0 3-4, W0 4-6, B1 6-7, W1 7-9: busy 8
    of 9, bubble 1/9."""
    shown = widgets.explorer_pipelines(2, 2, v=2, forward_cost=1.0, input_cost=1.0,
                                       weight_cost=2.0)
    expected = {"gpipe": 1 / 3, "1f1b": 1 / 3, "interleaved": 1 / 5, "zb-h1": 1 / 9}
    for name, bubble in expected.items():
        assert shown[name]["simulated"] == pytest.approx(bubble, rel=1e-12), name
        assert shown[name]["formula"] == pytest.approx(bubble, rel=1e-12), name
    stage_0 = [(e["kind"], e["microbatch"], e["start"], e["end"])
               for e in shown["zb-h1"]["events"][0]]
    assert stage_0 == [("forward", 0, 0, 1), ("forward", 1, 1, 2), ("backward", 0, 3, 4),
                       ("weight", 0, 4, 6), ("backward", 1, 6, 7), ("weight", 1, 7, 9)]


def test_interleaved_is_refused_with_its_reason_when_m_is_no_multiple_of_p():
    shown = widgets.explorer_pipelines(4, 6, v=2)
    assert shown["interleaved"]["events"] is None
    assert "expected a multiple of 4, got 6" in shown["interleaved"]["title"]
    assert shown["zb-h1"]["simulated"] == pytest.approx(shown["zb-h1"]["formula"])


def test_bubble_explorer_builds_and_draws_the_four_schedules():
    import matplotlib.pyplot as plt

    plt.close("all")
    draw = widgets.bubble_explorer()
    assert callable(draw)
    axes = plt.gcf().axes
    assert [ax.get_title(loc="left").split(",")[0].split(":")[0] for ax in axes] == \
        ["gpipe", "1f1b", "interleaved", "zb-h1"]
    plt.close("all")
    draw(p=4, m=6, v=2)  # interleaved refused: its panel says why, the others are drawn
    titles = [ax.get_title(loc="left") for ax in plt.gcf().axes]
    assert "multiple of 4" in titles[2] and "simulated" in titles[3]
    plt.close("all")


def test_pipeline_timeline_draws_one_bar_per_event():
    events = [[{"kind": "forward", "microbatch": 0, "start": 0.0, "end": 1.0},
               {"kind": "backward", "microbatch": 0, "start": 2.0, "end": 4.0}],
              [{"kind": "forward", "microbatch": 0, "start": 1.0, "end": 2.0}]]
    ax = viz.plot_pipeline_timeline(events, scale=1.0)
    widths = sorted(round(patch.get_width(), 6) for patch in ax.patches)
    assert widths == [1.0, 1.0, 2.0]


def test_pipeline_timeline_draws_weight_bars_and_labels_chunks():
    events = [[{"kind": "forward", "microbatch": 3, "chunk": 1, "start": 0.0, "end": 1.0},
               {"kind": "backward", "microbatch": 3, "chunk": 0, "start": 1.0, "end": 2.0},
               {"kind": "weight", "microbatch": 3, "chunk": 0, "start": 2.0, "end": 4.0},
               {"kind": "send", "microbatch": 3, "start": 4.0, "end": 4.5}]]
    ax = viz.plot_pipeline_timeline(events, scale=1.0)
    assert [t.get_text() for t in ax.texts] == ["3", "3", "3"]
    bars = ax.patches[:4]  # in event order (the legend's patches are not axes patches)
    assert [round(bar.get_width(), 6) for bar in bars] == [1.0, 1.0, 2.0, 0.5]
    blue = matplotlib.colors.to_rgb("tab:blue")  # chunk 1 of 2: halfway to white
    np.testing.assert_allclose(bars[0].get_facecolor()[:3], [(c + 1) / 2 for c in blue])
    np.testing.assert_allclose(bars[2].get_facecolor()[:3], matplotlib.colors.to_rgb("tab:green"))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == \
        ["forward", "backward", "weight", "send"]
    matplotlib.pyplot.close("all")


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


def test_decode_explorer_by_hand():
    """GPT-3 6.7B on an A100: 2 bytes x ~6.5e9 matmul weights read per step at 2.039 TB/s is
    ~6.4 ms whatever the batch while memory-bound; B* = 312e12 / 2.039e12 x 2 / 2 = 153."""
    spec = widgets.PLANNER_MODELS["GPT-3 6.7B"]
    n = 32 * (4 * 4096**2 + 2 * 4096 * 16384) + 4096 * 50257
    one = widgets.explorer_decode("GPT-3 6.7B", "A100 80GB (bf16)", 1, 1)
    read = n * 2 + 2 * 32 * 4096 * 2  # the weights and one token's cache
    assert one["bound"] == "memory" and one["step_ms"] == pytest.approx(read / 2.039e12 * 1e3)
    assert one["memory_bound_batch"] == pytest.approx(312e12 / 2.039e12)
    big = widgets.explorer_decode("GPT-3 6.7B", "A100 80GB (bf16)", 1024, 1)
    flops = 1024 * (2 * n + 4 * 32 * 4096 * 1)
    assert big["bound"] == "compute" and big["step_ms"] == pytest.approx(flops / 312e12 * 1e3)
    assert big["tokens_per_s"] == pytest.approx(1024 / (flops / 312e12))
    assert one["fits"] and one["memory_gb"] == pytest.approx(read / 1e9)
    long = widgets.explorer_decode("GPT-3 6.7B", "A100 80GB (bf16)", 256, 1024)
    cache = 256 * 1024 * 2 * 32 * 4096 * 2  # 137 GB of KV cache: memory-bound, and too big
    assert long["bound"] == "memory" and not long["fits"]
    assert long["memory_gb"] == pytest.approx((n * 2 + cache) / 1e9)
    assert spec.d_model == 4096
    with pytest.raises(ValueError, match=r"model_name, device: expected one of"):
        widgets.explorer_decode("GPT-4", "A100 80GB (bf16)", 1, 1)
    with pytest.raises(ValueError, match=r"batch, context: expected positive integers, got 0"):
        widgets.explorer_decode("GPT-3 6.7B", "A100 80GB (bf16)", 0, 1)


def test_decode_explorer_builds():
    assert callable(widgets.decode_explorer())

"""The evaluation's metrics, and a small held-out slice meeting conservative bounds."""

from __future__ import annotations

from dataclasses import replace

from mesh.services.inference.strip.calibrate import calibrate
from mesh.services.inference.strip.evaluate import (
    Record,
    limit_of_detection,
    metrics,
    run_split,
    wilson_interval,
)
from mesh.services.inference.strip.generator import GeneratorOptions, generate, split_seeds
from mesh.services.inference.strip.reader import Scores, StripReader
from mesh.services.inference.strip.types import ABSENT_LINE, LineReading, QualityFlag, StripReading, Verdict

BASE_TRUTH = generate(0, GeneratorOptions(size=(320, 240))).truth


def _record(seed: int, t_contrast: float, found: bool) -> Record:
    truth = replace(
        BASE_TRUTH,
        seed=seed,
        verdict=Verdict.POSITIVE,
        test_line=replace(BASE_TRUTH.test_line, present=True, contrast=t_contrast),
        t_to_c=2 * t_contrast,
    )
    line = LineReading(True, 1.0, 0.4, t_contrast, 1.0, 1.0) if found else ABSENT_LINE
    reading = StripReading(
        Verdict.POSITIVE if found else Verdict.NEGATIVE,
        line,
        line,
        2 * t_contrast if found else 0.0,
        0.9,
        (),
        None,
        False,
    )
    return Record(truth, reading, Scores(found=True))


def test_limit_of_detection_is_the_lowest_bin_from_which_all_pass() -> None:
    """LoD is the lower edge of the lowest bin from which on every populated bin finds T in >= 95 %."""
    records = [_record(0, 0.012, i < 2) for i in range(10)]  # 20 % found
    records += [_record(0, 0.035, True) for _ in range(10)]  # 3-4 %: all found
    records += [_record(0, 0.045, i < 9) for i in range(10)]  # 4-5 %: 90 %
    records += [_record(0, 0.3, True) for _ in range(10)]
    lod, bins = limit_of_detection(records)
    assert lod == 0.2  # the 4-5 % bin fails, so neither it nor 3-4 % counts; 5-20 % holds too few images
    assert sum(b["count"] for b in bins) == 40
    records[20:30] = [_record(0, 0.045, True) for _ in range(10)]
    assert limit_of_detection(records)[0] == 0.03


def test_limit_of_detection_none_when_the_top_bin_fails() -> None:
    """When even the strongest lines are missed, there is no limit of detection."""
    lod, _ = limit_of_detection([_record(0, 0.3, False) for _ in range(10)])
    assert lod is None


def test_wilson_interval_matches_known_values_and_stays_inside_zero_one() -> None:
    """95 % Wilson intervals: 39 of 43 is 0.784-0.963, 1963 of 2000 is 0.9746-0.9865; all or none found keeps
    a width (600 of 600 is 0.9936-1, 0 of 600 is 0-0.0064); no trials, no interval."""
    assert wilson_interval(39, 43) == (0.784, 0.9632)
    assert wilson_interval(1963, 2000) == (0.9746, 0.9865)
    assert wilson_interval(600, 600) == (0.9936, 1.0)
    assert wilson_interval(0, 600) == (0.0, 0.0064)
    assert wilson_interval(0, 0) is None


def test_metrics_give_each_share_and_bin_its_interval() -> None:
    """Every share the targets name, and every limit-of-detection bin, carries an interval around its value;
    an empty class has neither."""
    records = [_record(0, 0.035, i < 9) for i in range(10)] + [_record(0, 0.3, True) for _ in range(10)]
    result = metrics(records)
    intervals = result["intervals_95"]
    assert intervals["accuracy"] == wilson_interval(19, 20)
    assert intervals["positive_recall"] == wilson_interval(19, 20)
    assert result["accuracy"] == result["positive_recall"] == 0.95
    assert result["invalid_recall"] is None
    assert intervals["invalid_recall"] is None
    bins = {b["from"]: b for b in result["lod_bins"]}
    assert bins[0.03]["rate_95"] == wilson_interval(9, 10)
    assert bins[0.2]["rate_95"] == wilson_interval(10, 10)
    assert bins[0.01]["rate_95"] is None
    low, high = bins[0.03]["rate_95"]
    assert low < bins[0.03]["rate"] < high


def test_heldout_slice_meets_conservative_bounds() -> None:
    """On 60 held-out images: accuracy >= 90 %, INVALID recall >= 95 %, no verdict without a strip."""
    records = run_split(StripReader(), split_seeds("heldout", 60))
    result = metrics(records)
    assert result["accuracy"] >= 0.9
    assert result["invalid_recall"] >= 0.95
    assert result["never_verdict_without_strip"]
    for record in records:
        if QualityFlag.STRIP_NOT_FOUND in record.reading.quality_flags:
            assert record.reading.verdict is Verdict.INVALID


def test_lossless_reads_the_same_scenes_saved_as_png() -> None:
    """``--lossless`` changes only how each picture is saved: the same truth (lines, contrast, size, blur),
    PNG where the seed drew a JPEG."""
    seeds = split_seeds("heldout", 8)
    drawn = run_split(StripReader(), seeds)
    lossless = run_split(StripReader(), seeds, lossless=True)
    assert {r.truth.image_format for r in drawn} == {"png", "jpeg"}
    assert {r.truth.image_format for r in lossless} == {"png"}
    for a, b in zip(drawn, lossless, strict=True):
        assert replace(a.truth, image_format="png", jpeg_quality=0) == replace(b.truth, jpeg_quality=0)


def test_calibrate_takes_each_threshold_from_its_own_class_draws() -> None:
    """``calibrate(N)`` reads 3N train seeds drawn as negatives (half cassettes, half bare strips), N as invalid
    strips and N/2 as positives; each T threshold (cassette window, bare strip) is its own negatives' 99.75th
    percentile plus a quarter, so it lies between their 99th and 99.8th percentiles plus a quarter."""
    result = calibrate(6, workers=1)
    images = result["images"]
    assert images["negative"] == 18
    assert (images["invalid"], images["positive"]) == (6, 3)
    # Each negative with a C found is read either through a window or as a bare strip.
    assert images["negative_framed"] >= 6
    assert images["negative_bare"] >= 6
    assert images["negative_framed"] + images["negative_bare"] <= 18
    assert result["invalid_c_snr_quantiles"] is not None
    for key, name in (
        ("negative_t_snr_quantiles", "t_min_snr"),
        ("bare_negative_t_snr_quantiles", "t_min_snr_bare"),
    ):
        negative = result[key]
        assert negative is not None
        proposed = result["proposed"][name]
        assert negative["q990"] + 0.25 - 0.01 <= proposed <= negative["q998"] + 0.25 + 0.01
    assert result["proposed"]["c_min_snr"] >= 6.0

"""raycls.augment: every op, every policy, the policy strings, mixup/cutmix, PBA schedules.

Ops are checked against torchvision's reference kernels where one exists with the same
parameters, and for the contract the training loop relies on: shape, dtype, device and [0, 1]
range kept, magnitude 0 is the identity where that holds, a seeded generator reproduces a batch,
and every image in a batch draws its own parameters.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from raycls.augment import (
    build_augment,
    canonical_policy,
    explore_policy,
    load_policy_schedule,
    mix_batch,
    parse_policy,
    policy_for_epoch,
    policy_slug,
    save_policy_schedule,
)
from raycls.augment import ops as A

torch.set_num_threads(1)

OP_NAMES = [n for n in A.OPS if n != "identity"]
# ops whose magnitude 0 must leave the image exactly as it was
IDENTITY_AT_ZERO = [
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "contrast",
    "color", "sharpness", "posterize", "solarize", "cutout",
]  # fmt: skip
POLICIES = [
    "none",
    "default",
    "crop2",
    "flip",
    "cutout4",
    "rand-n2-m9",
    "rand-n1-m30",
    "trivial",
    "autoaug-cifar10",
    "pba:rotate=0.3/5,shear_x=0.1/2,color=0.5/9,equalize=0.5/0,invert=0.2/0,cutout=0.4/9",
    "crop2-flip-rand-n2-m9-cutout4",
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rng(seed: int = 0) -> A._Rng:
    return A._Rng(gen(seed), torch.device("cpu"))


def make_images(b: int = 8, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images on the uint8 grid (what the data pipeline produces), as float in [0, 1]."""
    u8 = torch.randint(0, 256, (b, c, size, size), generator=gen(seed), dtype=torch.uint8)
    return u8.float() / 255


def apply_op(name: str, images: torch.Tensor, magnitude: float | torch.Tensor, seed: int = 0):
    f = torch.as_tensor(magnitude, dtype=torch.float32).expand(len(images)).clone()
    return A.OPS[name](images, f, rng(seed), A.STANDARD)


# ----------------------------------------------------------------------------- each op


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", OP_NAMES)
def test_op_keeps_shape_dtype_range(name: str, channels: int) -> None:
    x = make_images(c=channels)
    before = x.clone()
    mags = torch.rand(len(x), generator=gen(1))
    y = apply_op(name, x, mags)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.isfinite(y).all()
    assert torch.equal(x, before), "ops must not modify their input"


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", IDENTITY_AT_ZERO)
def test_op_magnitude_zero_is_identity(name: str, channels: int) -> None:
    x = make_images(c=channels)
    torch.testing.assert_close(apply_op(name, x, 0.0), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in OP_NAMES if n != "color"])
def test_op_full_magnitude_changes_images(name: str) -> None:
    # guards against an op that silently does nothing (magnitude ignored, wrong mask, ...);
    # a low-contrast batch so that autocontrast and equalize have something to do
    x = make_images(c=1) * 0.5 + 0.2
    assert (apply_op(name, x, 1.0) - x).abs().max() > 0.05


def test_color_is_identity_on_grey_and_acts_on_rgb() -> None:
    grey = make_images(c=1)
    assert torch.equal(apply_op("color", grey, 1.0), grey)
    rgb = make_images(c=3)
    assert (apply_op("color", rgb, 1.0) - rgb).abs().max() > 0.05


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_seeded_determinism(name: str) -> None:
    x = make_images()
    mags = torch.rand(len(x), generator=gen(1))
    assert torch.equal(apply_op(name, x, mags, seed=3), apply_op(name, x, mags, seed=3))


@pytest.mark.parametrize("factor", [0.0, 0.4, 1.7])
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (A.brightness, TF.adjust_brightness),
        (A.contrast, TF.adjust_contrast),
        (A.color, TF.adjust_saturation),
        (A.sharpness, TF.adjust_sharpness),
    ],
)
def test_enhance_ops_match_torchvision(ours, theirs, factor: float) -> None:
    x = make_images(b=2, c=3)
    # a different factor per image: each must match torchvision run on that image alone
    factors = torch.tensor([factor, factor + 0.3])
    y = ours(x, factors)
    for i in range(len(x)):
        torch.testing.assert_close(y[i], theirs(x[i], float(factors[i])), atol=1e-5, rtol=0)


def test_posterize_solarize_autocontrast_equalize_invert_match_torchvision() -> None:
    x = make_images(b=3, c=3)
    bits = torch.tensor([1, 4, 6])
    y = A.posterize(x, bits)
    for i in range(3):
        torch.testing.assert_close(y[i], TF.posterize(x[i], int(bits[i])))
    # thresholds off the 1/255 grid, where `>` (ours) and `>=` (torchvision) agree
    thr = torch.tensor([0.1001, 0.5001, 0.9001])
    y = A.solarize(x, thr)
    for i in range(3):
        torch.testing.assert_close(y[i], TF.solarize(x[i], float(thr[i])))
    torch.testing.assert_close(A.autocontrast(x * 0.5 + 0.2), TF.autocontrast(x * 0.5 + 0.2))
    torch.testing.assert_close(A.equalize(x), TF.equalize(x))
    torch.testing.assert_close(A.invert(x), TF.invert(x))


def test_rotate_90_matches_torchvision_and_translate_shifts_pixels() -> None:
    x = make_images(b=2, c=1)
    y = A.rotate(x, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(y[0], TF.rotate(x[0], 90.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], TF.rotate(x[1], -90.0), atol=1e-5, rtol=0)
    # translate by whole pixels: an exact shift with black fill
    y = A.translate(x, torch.tensor([3.0, -2.0]), "x")
    torch.testing.assert_close(y[0, :, :, 3:], x[0, :, :, :-3], atol=1e-5, rtol=0)
    assert float(y[0, :, :, :3].abs().max()) < 1e-6
    torch.testing.assert_close(y[1, :, :, :-2], x[1, :, :, 2:], atol=1e-5, rtol=0)
    y = A.translate(x, torch.tensor([1.0, 1.0]), "y")
    torch.testing.assert_close(y[:, :, 1:], x[:, :, :-1], atol=1e-5, rtol=0)


def test_random_crop_is_a_shift_of_at_most_pad_with_every_offset_used() -> None:
    b, size, pad = 400, 9, 2
    x = torch.zeros(b, 1, size, size)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the middle: its new place gives the offset
    y = A.random_crop(x, pad, rng())
    assert torch.equal(y.sum((1, 2, 3)), torch.ones(b)), "crop must move, not drop, the pixel"
    where = y.view(b, -1).argmax(1)
    dy, dx = where // size - 4, where % size - 4
    assert dy.abs().max() <= pad and dx.abs().max() <= pad
    offsets = set(zip(dy.tolist(), dx.tolist(), strict=True))
    assert len(offsets) == (2 * pad + 1) ** 2, "every image must draw its own offset"


def test_random_flip_flips_about_half() -> None:
    x = make_images(b=200, c=1)
    y = A.random_flip(x, rng())
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert (same | flipped).all()
    assert 60 < int(flipped.sum()) < 140


def test_cutout_blanks_one_square_with_the_image_mean() -> None:
    x = make_images(b=50, c=3, size=16)
    y = A.cutout(x, torch.full((50,), 6), rng())
    changed = (y != x).any(1)  # (B, H, W)
    counts = changed.flatten(1).sum(1)
    assert counts.max() <= 36 and (counts > 0).all()
    mean = x.mean((2, 3), keepdim=True).expand_as(x)
    mask = changed.unsqueeze(1).expand_as(x)
    torch.testing.assert_close(y[mask], mean[mask])


def test_cutout_size_zero_is_identity() -> None:
    x = make_images()
    assert torch.equal(A.cutout(x, torch.zeros(len(x)), rng()), x)


# ----------------------------------------------------------------------------- policies


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_contract(policy: str, channels: int) -> None:
    aug = build_augment(policy, channels=channels, image_size=16, allow_flip=True)
    x = make_images(b=32, c=channels)
    before = x.clone()
    y = aug(x, gen(0))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(x, before), "augment must not modify the caller's batch"
    assert torch.equal(aug(x, gen(0)), y), "same seed, same batch"
    if policy != "none":
        assert not torch.equal(aug(x, gen(1)), y), "another seed must give another batch"
    aug(x)  # no generator: torch's global RNG


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_policy_randomness_is_per_image(policy: str) -> None:
    # 64 copies of one image: a per-batch (not per-image) draw would give 64 equal outputs
    aug = build_augment(policy, channels=3, image_size=16, allow_flip=True)
    x = make_images(b=1, c=3).expand(64, -1, -1, -1).contiguous()
    y = aug(x, gen(0))
    distinct = torch.unique(y.flatten(1), dim=0)
    assert len(distinct) >= (2 if policy == "flip" else 3)


def test_pba_all_zero_is_identity_and_invert_only_hits_80_percent() -> None:
    x = make_images(b=2000, c=1, size=4)
    assert torch.equal(build_augment("pba:", channels=1, image_size=4, allow_flip=False)(x), x)
    aug = build_augment("pba:invert=1/0", channels=1, image_size=4, allow_flip=False)
    y = aug(x, gen(0))
    inverted = (y == 1 - x).flatten(1).all(1)
    unchanged = (y == x).flatten(1).all(1)
    assert (inverted | unchanged).all()
    # PBA draws 0 ops for 20% of images, so a p=1 op reaches the other 80%
    assert 0.75 < inverted.float().mean() < 0.85


def test_pba_applies_at_most_two_ops() -> None:
    # invert and solarize(threshold 0, i.e. invert non-zero pixels) both at p=1. PBA draws 0, 1
    # or 2 ops (p .2/.3/.5): 0 ops or both (cancelling out) leave 70% of images unchanged, one op
    # inverts 30%; a third op, or a second that never comes, would shift these shares
    x = make_images(b=2000, c=1, size=4) * 0.9 + 0.05  # no zero pixels
    aug = build_augment("pba:invert=1/0,solarize=1/9", channels=1, image_size=4, allow_flip=False)
    y = aug(x, gen(0))
    unchanged = (y - x).abs().flatten(1).max(1).values < 1e-6
    inverted = (y - (1 - x)).abs().flatten(1).max(1).values < 1e-6
    assert (unchanged | inverted).all()
    assert 0.65 < unchanged.float().mean() < 0.75


def test_autoaugment_table_uses_known_ops() -> None:
    assert len(A.AUTOAUG_CIFAR10) == 25
    for sub in A.AUTOAUG_CIFAR10:
        for name, p, level in sub:
            assert name in A.PBA_OPS and 0 <= p <= 1 and 0 <= level <= A.LEVELS


def test_rejects_non_float_images() -> None:
    aug = build_augment("crop2", channels=1, image_size=16, allow_flip=False)
    with pytest.raises(ValueError, match="float images"):
        aug(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_rejects_wrong_channel_count() -> None:
    aug = build_augment("crop2", channels=3, image_size=16, allow_flip=True)
    with pytest.raises(ValueError, match="3-channel"):
        aug(torch.zeros(2, 1, 16, 16))


def test_empty_batch() -> None:
    aug = build_augment("crop2-rand-n2-m9", channels=1, image_size=16, allow_flip=False)
    assert aug(torch.zeros(0, 1, 16, 16)).shape == (0, 1, 16, 16)


# ----------------------------------------------------------------------------- policy strings


@pytest.mark.parametrize(
    "given_policy,size,allow_flip,canonical",
    [
        ("none", 32, True, "none"),
        ("default", 32, True, "crop4-flip"),
        ("default", 28, False, "crop3"),
        ("default", 8, False, "crop1"),
        ("flip-crop4", 32, True, "crop4-flip"),
        ("cutout8-rand-m9-n2-flip-crop4", 32, True, "crop4-flip-rand-n2-m9-cutout8"),
        ("rand", 32, True, "rand-n2-m9"),
        ("RAND-N3-M15", 32, True, "rand-n3-m15"),
        ("autoaug", 32, True, "autoaug-cifar10"),
        ("trivial-cutout4", 32, True, "trivial-cutout4"),
        ("pba:invert=0.10/0,rotate=0.3/5", 32, True, "pba:rotate=0.3/5,invert=0.1/0"),
        ("pba:rotate=0/0,shear_x=1.0/9", 32, True, "pba:shear_x=1/9"),
        ("crop4-pba:", 32, True, "crop4-pba:"),
    ],
)
def test_canonical_policy(given_policy: str, size: int, allow_flip: bool, canonical: str) -> None:
    assert canonical_policy(given_policy, image_size=size, allow_flip=allow_flip) == canonical
    # the canonical string is a fixed point: str(parse(s)) == canonical(s)
    assert str(parse_policy(canonical, image_size=size, allow_flip=allow_flip)) == canonical
    aug = build_augment(given_policy, channels=1, image_size=size, allow_flip=allow_flip)
    assert aug.policy == canonical


@pytest.mark.parametrize(
    "bad,why",
    [
        ("", "empty"),
        ("foo", "unknown component"),
        ("crop", "unknown component"),
        ("crop0", "at least 1"),
        ("crop40", "smaller than the image size"),
        ("crop4-crop2", "twice"),
        ("none-flip", "cannot be combined"),
        ("rand-n0-m9", "n in 1"),
        ("rand-n2-m31", "m in 0..30"),
        ("rand-trivial", "only one of"),
        ("pba:rotate=2/5", "probability must be in"),
        ("pba:rotate=0.5/10", "level in 0..9"),
        ("pba:spin=0.5/1", "unknown PBA op"),
        ("pba:rotate=0.5", "is not <op>"),
        ("pba:rotate=0.1/1,rotate=0.2/2", "listed twice"),
        ("pba:rotate=0..1/1", "not a number"),
    ],
)
def test_bad_policy_strings_raise_clear_errors(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_policy(bad)
    assert "valid policies" in str(info.value)


def test_flip_refused_where_not_allowed() -> None:
    with pytest.raises(ValueError, match="flip is disabled"):
        build_augment("crop3-flip", channels=1, image_size=28, allow_flip=False)


def test_policy_slug_is_file_name_safe_and_distinct() -> None:
    assert policy_slug("crop4-flip-rand-n2-m9") == "crop4-flip-rand-n2-m9"
    assert policy_slug("pba:rotate=0.3/5") == "pba_rotate_0.3_5"
    full = "pba:" + ",".join(f"{n}=0.5/5" for n in A.PBA_OPS)
    other = full.replace("cutout=0.5/5", "cutout=0.4/5")
    assert len(policy_slug(full)) <= 60 and "/" not in policy_slug(full)
    assert policy_slug(full) != policy_slug(other)


PBA_TABLES = st.dictionaries(
    st.sampled_from(A.PBA_OPS),
    st.tuples(st.integers(0, 10).map(lambda t: t / 10), st.integers(0, 9)),
)


@settings(max_examples=60, deadline=None)
@given(
    table=PBA_TABLES,
    crop=st.integers(0, 4),
    flip=st.booleans(),
    cut=st.integers(0, 8),
    order=st.randoms(use_true_random=False),
)
def test_pba_policy_round_trip(table, crop, flip, cut, order) -> None:
    parts = [f"crop{crop}"] * bool(crop) + ["flip"] * flip + [f"cutout{cut}"] * bool(cut)
    parts.append("pba:" + ",".join(f"{n}={p}/{m}" for n, (p, m) in table.items()))
    order.shuffle(parts)
    text = "-".join(parts)
    canonical = canonical_policy(text)
    assert canonical_policy(canonical) == canonical
    parsed = parse_policy(canonical)
    assert parsed.crop == crop and parsed.flip == flip and parsed.cutout == cut
    got = parsed.core.table()
    for name in A.PBA_OPS:
        assert got[name] == table.get(name, (0.0, 0))


# ----------------------------------------------------------------------------- mixup / cutmix


def test_mix_batch_off_gives_one_hot() -> None:
    x = make_images(b=4)
    labels = torch.tensor([0, 2, 1, 2])
    images, targets = mix_batch(x, labels, 3, 0.0, 0.0, gen())
    assert torch.equal(images, x)
    assert targets.dtype == torch.float32 and targets.shape == (4, 3)
    assert torch.equal(targets, torch.eye(3)[labels])


def test_mixup_targets_describe_the_mix_exactly() -> None:
    # labels 0..B-1 make each target row the weights of the images mixed into that image
    x = make_images(b=6)
    images, targets = mix_batch(x, torch.arange(6), 6, 0.4, 0.0, gen(2))
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert (targets.diagonal() < 1).any(), "mixup with alpha 0.4 must mix something"
    torch.testing.assert_close(images.flatten(1), targets @ x.flatten(1))


def test_cutmix_targets_are_the_pixel_shares() -> None:
    x = make_images(b=6)
    images, targets = mix_batch(x, torch.arange(6), 6, 0.0, 1.0, gen(5))
    for i in range(6):
        own = (images[i] == x[i]).all(0).float().mean()  # share of pixels still from image i
        assert torch.isclose(targets[i, i], own, atol=1 / 256) or targets[i, i] == 1
        assert torch.isclose(targets[i].sum(), torch.tensor(1.0))


def test_mix_batch_is_seeded_and_checks_input() -> None:
    x, labels = make_images(b=8), torch.arange(8) % 3
    a = mix_batch(x, labels, 3, 0.2, 1.0, gen(7))
    b = mix_batch(x, labels, 3, 0.2, 1.0, gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match=">= 0"):
        mix_batch(x, labels, 3, -1.0, 0.0)
    with pytest.raises(ValueError, match="labels"):
        mix_batch(x, labels[:3], 3, 0.2, 0.0)


# ----------------------------------------------------------------------------- schedules


def test_schedule_save_load_round_trip(tmp_path) -> None:
    path = tmp_path / "schedule.json"
    schedule = [(0, "pba:"), (3, "pba:rotate=0.3/5"), (7, "crop4-flip-rand-n2-m9")]
    save_policy_schedule(str(path), schedule)
    assert load_policy_schedule(str(path)) == schedule
    assert json.loads(path.read_text())["format"] == "raycls-aug-schedule"
    assert [policy_for_epoch(schedule, e) for e in (0, 2, 3, 6, 7, 100)] == [
        "pba:", "pba:", "pba:rotate=0.3/5", "pba:rotate=0.3/5",
        "crop4-flip-rand-n2-m9", "crop4-flip-rand-n2-m9",
    ]  # fmt: skip


def test_schedule_accepts_a_bare_list_and_canonicalises(tmp_path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps([[0, "flip-crop4"], [5, "Default"]]))
    assert load_policy_schedule(str(path)) == [(0, "crop4-flip"), (5, "default")]


@pytest.mark.parametrize(
    "content,why",
    [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty list"),
        ('[[1, "none"]]', "start at epoch 0"),
        ('[[0, "none"], [0, "flip"]]', "strictly increase"),
        ('[[0, "none"], ["3", "flip"]]', "is not \\[start_epoch"),
        ('[[0, "warp9"]]', "unknown component"),
    ],
)
def test_bad_schedule_files(tmp_path, content: str, why: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=why):
        load_policy_schedule(str(path))


def test_missing_schedule_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_policy_schedule(str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------- explore (PBT)


def test_explore_pba_moves_within_bounds_and_is_seeded() -> None:
    policy = "crop4-flip-pba:"
    seen = set()
    for step in range(30):
        new = explore_policy(policy, random.Random(step))
        assert new == explore_policy(policy, random.Random(step))
        parsed = parse_policy(new)
        assert (parsed.crop, parsed.flip) == (4, True), "explore must keep crop/flip"
        for p, level in parsed.core.table().values():
            assert 0 <= p <= 1 and round(p * 10) == p * 10 and 0 <= level <= 9
        seen.add(new)
        policy = new
    assert len(seen) > 20, "explore should keep moving the policy"


def test_explore_steps_are_small_unless_resampled() -> None:
    # PBA: each value is resampled uniformly (20%) or moved by at most 3 steps, so jumps of more
    # than 3 steps are rare (about 7% of probabilities from 0.5, 6% of levels from 5)
    start = "pba:" + ",".join(f"{n}=0.5/5" for n in A.PBA_OPS)
    jumps = moves = 0
    for seed in range(40):
        table = parse_policy(explore_policy(start, random.Random(seed))).core.table()
        for p, level in table.values():
            jumps += (abs(round(p * 10) - 5) > 3) + (abs(level - 5) > 3)
            moves += (round(p * 10) != 5) + (level != 5)
    total = 40 * len(A.PBA_OPS) * 2
    assert jumps < 0.15 * total and moves > 0.5 * total


def test_explore_other_policies() -> None:
    r = random.Random(0)
    for _ in range(20):
        p = parse_policy(explore_policy("crop2-rand-n2-m9", r))
        assert p.crop == 2 and 1 <= p.core.num_ops <= 4 and 0 <= p.core.magnitude <= 30
    for fixed in ("none", "trivial", "autoaug-cifar10", "crop4-flip", "default"):
        assert explore_policy(fixed, r) == canonical_policy(fixed) or fixed == "default"
    assert explore_policy("default", r) == "default"


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", POLICIES)
def test_policies_on_cuda(policy: str) -> None:
    aug = build_augment(policy, channels=3, image_size=16, allow_flip=True)
    x = make_images(b=64).cuda()
    for g in (gen(0), torch.Generator(device="cuda").manual_seed(0), None):
        y = aug(x, g)
        assert y.device == x.device and y.shape == x.shape
        assert float(y.min()) >= 0 and float(y.max()) <= 1
    # a CPU generator draws the same parameters on CUDA: the same result up to float rounding
    # (mean, not max: rounding can tip a posterize/solarize step for the odd pixel)
    diff = (aug(x, gen(3)).cpu() - aug(x.cpu(), gen(3))).abs()
    assert float(diff.mean()) < 1e-3
    images, targets = mix_batch(x, torch.arange(64).cuda() % 10, 10, 0.2, 1.0, gen(0))
    assert images.is_cuda and targets.is_cuda

"""Baselines (WSL DenseNet-161 with/without AdaBN, MU-Nets) and the plate sampler: parameter counts against the
paper, shapes, training steps, ghost-batch-norm semantics, sampler properties, bad input."""
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from mae_fast.data.labels import PerturbationLabels
from mae_fast.models.baseline_common import standardized
from mae_fast.models import config_from_dict, count_parameters, create_model, list_models, model_config
from mae_fast.training.recipes import OptimizerRecipe, build_optimizer, optimizer_recipe
from mae_fast.models.munet import MUNetConfig, MaskedUNet
from mae_fast.models.wsl import GhostBatchNorm, WSLClassifier, WSLConfig
from mae_fast.data.index import SiteIndex
from mae_fast.data.sites import Site
from mae_fast.data.samplers import PlateBatchSampler, balanced_batch_sizes

PAPER_PARAMS = {"wsl_densenet161_256": 28e6, "wsl_densenet161_adabn_256": 28e6, "munet_m_256": 52e6,
                "munet_l_256": 135e6}


def meta_model(name, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


def smooth_images(batch, size, seed=0):
    """uint8 crops with structure wider than a mask patch (so hidden patches can be inferred from their border)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 6, size // 16, size // 16, generator=g)
    up = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (up * 255).round().to(torch.uint8)


def raw_images(batch, size, chans=6, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    high = 256 if dtype == torch.uint8 else 65536
    return torch.randint(0, high, (batch, chans, size, size), generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------------------
# parameter counts and architecture
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    model = meta_model(name)
    if name.startswith("wsl"):  # the paper's count is backbone + neck (the classifier depends on the label set)
        n = count_parameters(model.features) + count_parameters(model.neck)
        assert model.head is None
    else:
        n = count_parameters(model)
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.05, n


def test_exact_counts_are_the_documented_ones():
    wsl = meta_model("wsl_densenet161_256")
    assert count_parameters(wsl.features) == 26_486_112
    assert count_parameters(wsl.neck) == 2208 * 128 + 128 * 128 + 2 * (2208 + 128 + 128)
    assert count_parameters(meta_model("munet_m_256")) == 51_324_158
    assert count_parameters(meta_model("munet_l_256")) == 135_573_950
    # with a classifier: one Linear(128, classes) more
    assert count_parameters(meta_model("wsl_densenet161_256", num_classes=1139).head) == 128 * 1139 + 1139


def test_densenet_matches_torchvision_layout():
    tv_models = pytest.importorskip("torchvision.models")
    with torch.device("meta"):
        tv = tv_models.densenet161().features
    ours = meta_model("wsl_densenet161_256").features
    theirs = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert set(mine) == set(theirs)
    differ = {k for k in mine if mine[k] != theirs[k]}
    assert differ == {"conv0.weight"} and mine["conv0.weight"] == (96, 6, 7, 7)
    assert count_parameters(ours) == count_parameters(tv) + 96 * 3 * 7 * 7
    assert ours.out_channels == 2208


def test_adabn_and_plain_wsl_share_state_dict_names():
    plain = meta_model("wsl_densenet_micro_256").state_dict()
    ada = meta_model("wsl_densenet_micro_adabn_256").state_dict()
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in ada.items()}
    bn = nn.BatchNorm2d(5).state_dict()
    assert set(GhostBatchNorm(5).state_dict()) == set(bn)


def test_preset_details():
    assert {"wsl_densenet161_256", "wsl_densenet161_adabn_256", "munet_m_256", "munet_l_256"} <= set(
        list_models("baseline"))
    wsl = model_config("wsl_densenet161_256")
    wsl_opt = optimizer_recipe(wsl)  # the optimiser is the training side's recipe
    assert (wsl.growth_rate, wsl.block_config, wsl.num_init_features, wsl.bn_size, wsl.compression) == \
        (48, (6, 12, 36, 24), 96, 4, 0.5)
    assert wsl.embed_dim == 128 and wsl.in_chans == 6 and wsl.img_size == 256 and not wsl.adabn
    assert (wsl_opt.name, wsl_opt.momentum, wsl_opt.nesterov) == ("sgd", 0.9, True)
    assert wsl_opt.peak_lr(4096) == pytest.approx(1.6) and wsl_opt.peak_lr(256) == pytest.approx(0.1)
    assert model_config("wsl_densenet161_adabn_256").adabn
    m, L = model_config("munet_m_256"), model_config("munet_l_256")
    assert m.widths == (32, 64, 128, 256, 512) and L.widths == m.widths + (1024,)
    for cfg, opt in ((m, optimizer_recipe(m)), (L, optimizer_recipe(L))):
        assert (cfg.kernel_size, cfg.mask_ratio, opt.name, opt.lr, opt.betas, opt.weight_decay) == \
            (5, 0.25, "adamw", 1e-3, (0.9, 0.95), 0.05)
        assert opt.peak_lr(16384) == 1e-3  # no scaling: the seed keeps 1e-3 at 4,096 and 16,384
    assert m.embed_dim == 512 and L.embed_dim == 1024


def test_config_round_trip_and_errors():
    for name in list_models("baseline"):
        cfg = model_config(name)
        assert config_from_dict(cfg.to_dict()) == cfg
    cfg = model_config("munet_m_256", encoder_units=[1, 1, 1, 1, 1])
    assert cfg.encoder_units == (1, 1, 1, 1, 1)
    with pytest.raises(KeyError, match="available presets: .*munet_m_256"):
        model_config("munet_xl_256")
    with pytest.raises(ValueError, match=r"unknown config keys \['widht'\]"):
        model_config("munet_m_256", widht=3)
    with pytest.raises(ValueError, match="not a baseline config"):
        config_from_dict({"name": "x"})
    with pytest.raises(ValueError, match="unknown WSLConfig keys"):
        config_from_dict({"family": "wsl", "depth": 3})
    with pytest.raises(ValueError, match="decoder_units needs one count"):
        MUNetConfig(decoder_units=(1, 1))
    with pytest.raises(ValueError, match="multiple of 2\\^4"):
        MUNetConfig(img_size=200)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        MUNetConfig(kernel_size=4)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        MUNetConfig(mask_ratio=0.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        OptimizerRecipe("adam", lr=0.1, weight_decay=0.0)  # the optimiser is the recipe's, not WSLConfig's
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        WSLConfig(num_classes=-1)


# ------------------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["munet_m_256", "munet_l_256", "wsl_densenet161_256", "wsl_densenet161_adabn_256"])
def test_full_size_shapes_on_meta(name):
    model = meta_model(name, **({"num_classes": 11} if name.startswith("wsl") else {}))
    x = torch.empty(3, 6, 256, 256, dtype=torch.uint8, device="meta")
    assert model.embed(x).shape == (3, model.cfg.embed_dim)
    if name.startswith("munet"):
        out = model(x)
        assert out.pred.shape == (3, 6, 256, 256) and out.pixel_mask.shape == (3, 1, 256, 256)
        feats = model.encode(torch.empty(3, 6, 256, 256, device="meta"))
        assert [f.shape[1:] for f in feats] == [(w, 256 >> i, 256 >> i) for i, w in enumerate(model.cfg.widths)]
    else:
        out = model.features(torch.empty(3, 6, 256, 256, device="meta"))
        assert out.shape == (3, 2208, 8, 8)


def test_full_densenet161_runs_on_small_crops():
    model = create_model("wsl_densenet161_256", img_size=64, num_classes=5).eval()
    x = raw_images(2, 64, seed=1)
    z = model.embed(x)
    assert z.shape == (2, 128) and z.dtype == torch.float32 and torch.isfinite(z).all()
    model.train()
    out = model(x, torch.tensor([0, 4]))
    assert out.logits.shape == (2, 5) and torch.isfinite(out.loss)


def test_uint16_and_float_inputs_standardise_alike():
    model = create_model("munet_micro_256", img_size=64).eval()
    x16 = raw_images(2, 64, seed=2, dtype=torch.int32).to(torch.uint16)
    as_float = x16.to(torch.int32).float() / 65535.0
    assert torch.allclose(model.embed(x16), model.embed(as_float), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# training steps
# ------------------------------------------------------------------------------------------------------------

def _train_wsl(model, images, labels, steps, lr):
    opt = build_optimizer(model, lr=lr)
    model.train()
    with torch.no_grad():
        before = model(images, labels).loss.item()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(images, labels).loss
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(images, labels).loss.item()
    return before, after


@pytest.mark.parametrize("name", ["wsl_densenet_micro_256", "wsl_densenet_micro_adabn_256"])
def test_wsl_micro_training_lowers_the_loss(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=64, num_classes=3)
    images, labels = raw_images(12, 64, seed=3), torch.tensor([0, 1, 2] * 4)
    before, after = _train_wsl(model, images, labels, steps=8, lr=0.05)
    assert after < 0.3 * before, (before, after)


def test_wsl_densenet161_training_lowers_the_loss():
    torch.manual_seed(1)
    model = create_model("wsl_densenet161_256", img_size=32, num_classes=2)
    images, labels = raw_images(8, 32, seed=4), torch.tensor([0, 1] * 4)
    before, after = _train_wsl(model, images, labels, steps=3, lr=0.01)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("name,size,overrides,steps", [
    ("munet_micro_256", 64, {}, 12),
    ("munet_m_256", 32, {"mask_patch": 8}, 3),
])
def test_munet_training_lowers_the_masked_loss(name, size, overrides, steps):
    torch.manual_seed(2)
    model = create_model(name, img_size=size, **overrides)
    images = smooth_images(4, size, seed=5)
    opt = build_optimizer(model, lr=2e-3)
    model.train()

    def fixed_mask_loss():
        with torch.no_grad():
            return model(images, generator=torch.Generator().manual_seed(7)).loss.item()

    before = fixed_mask_loss()
    for _ in range(steps):
        opt.zero_grad()
        model(images).loss.backward()
        opt.step()
    assert fixed_mask_loss() < 0.85 * before


def test_munet_loss_is_the_mse_of_the_hidden_pixels_only():
    model = create_model("munet_micro_256", img_size=64)
    images = raw_images(3, 64, seed=6)
    seen = {}
    model.encoder[0].register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0].detach()))
    out = model(images, generator=torch.Generator().manual_seed(0))
    x = standardized(images)
    m = out.pixel_mask
    assert out.masking.mask.shape == (3, 16) and torch.all(out.masking.mask.sum(1) == 4)  # 25% of 16 patches
    assert float(m.mean()) == pytest.approx(0.25)
    # hidden pixels are zeroed in the standardised input, visible ones passed through
    assert torch.equal(seen["input"], x * (1 - m))
    expected = ((out.pred.float() - x) ** 2 * m).sum() / (m.sum() * 6)
    assert torch.allclose(out.loss, expected)
    # the mask is square 16x16 patches in row-major patch order
    patch = out.masking.mask[0].view(4, 4)
    assert torch.equal(m[0, 0, ::16, ::16], patch)
    grad_pred = torch.autograd.grad(out.loss, out.pred)[0]
    assert torch.all(grad_pred * (1 - m) == 0) and grad_pred.abs().sum() > 0
    again = model(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.masking.mask, out.masking.mask)
    x_std, masked, recon = model.reconstruct(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(recon * (1 - m), x_std * (1 - m)) and torch.equal(masked, x_std * (1 - m))


def test_build_optimizer_per_family():
    wsl = create_model("wsl_densenet_micro_256", img_size=64)
    sgd = build_optimizer(wsl, global_batch=1024)
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups
    assert g[0]["nesterov"] and g[0]["momentum"] == 0.9 and g[0]["lr"] == pytest.approx(0.4)
    assert g[0]["weight_decay"] == 1e-4 and g[1]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in g[0]["params"]) and all(p.ndim == 1 for p in g[1]["params"])
    adamw = build_optimizer(create_model("munet_micro_256", img_size=64))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["lr"] == 1e-3
    assert adamw.param_groups[0]["weight_decay"] == 0.05


# ------------------------------------------------------------------------------------------------------------
# ghost batch norm / AdaBN
# ------------------------------------------------------------------------------------------------------------

def test_ghost_bn_normalises_virtual_batches_separately():
    torch.manual_seed(3)
    x = torch.randn(10, 5, 3, 4) * 3 + 1
    ghost = GhostBatchNorm(5, virtual_batch_size=4, momentum=0.2)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 2)
        ghost.bias.normal_()
    ref = nn.BatchNorm2d(5, momentum=0.2)
    ref.load_state_dict(ghost.state_dict())
    out = ghost(x)
    chunks = (x[:4], x[4:7], x[7:])  # ceil(10 / 4) = 3 near-equal virtual batches
    expected = torch.cat([ref(c) for c in chunks])  # running stats updated once per virtual batch
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(ghost.running_mean, ref.running_mean) and torch.allclose(ghost.running_var, ref.running_var)
    assert int(ghost.num_batches_tracked) == 1
    # each virtual batch is standardised on its own (before the affine map)
    ghost_plain = GhostBatchNorm(5, virtual_batch_size=4)
    for c in ghost_plain(x).split([4, 3, 3]):
        assert torch.allclose(c.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-5)
    # one virtual batch = plain batch norm
    whole = GhostBatchNorm(5, virtual_batch_size=64)
    assert torch.allclose(whole(x), nn.BatchNorm2d(5)(x), atol=1e-5)


def test_adabn_uses_batch_statistics_at_inference():
    torch.manual_seed(4)
    x = torch.randn(6, 3, 2, 2) + 5
    ada = GhostBatchNorm(3, virtual_batch_size=2, adaptive=True)
    ada.train()
    ada(torch.randn(8, 3, 2, 2))
    running = ada.running_mean.clone()
    ada.eval()
    out = ada(x)
    assert torch.allclose(out, nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
    assert torch.equal(ada.running_mean, running)  # untouched at inference
    # not adaptive: running statistics, like nn.BatchNorm2d
    fixed = GhostBatchNorm(3, virtual_batch_size=2, adaptive=False)
    fixed.load_state_dict(ada.state_dict())
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(ada.state_dict())
    fixed.eval(), ref.eval()
    assert torch.allclose(fixed(x), ref(x), atol=1e-6)


def test_adabn_embedding_depends_on_the_batch_plain_bn_does_not():
    torch.manual_seed(5)
    a, b = raw_images(4, 64, seed=8), raw_images(4, 64, seed=9)
    ada = create_model("wsl_densenet_micro_adabn_256", img_size=64).eval()
    plain = create_model("wsl_densenet_micro_256", img_size=64).eval()
    for model, depends in ((ada, True), (plain, False)):
        alone = model.embed(a)
        with_b = model.embed(torch.cat([a, b]))[:4]
        assert torch.allclose(alone, with_b, atol=1e-5) != depends
    # AdaBN at inference: the same crops in another order give the same embeddings (statistics of the set)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(ada.embed(a)[perm], ada.embed(a[perm]), atol=1e-5)


def test_ghost_bn_needs_several_values_per_channel():
    ada = GhostBatchNorm(4, adaptive=True).eval()
    with pytest.raises(ValueError, match="more than one value per channel"):
        ada(torch.randn(1, 4))
    model = create_model("wsl_densenet_micro_adabn_256", img_size=64).eval()
    with pytest.raises(ValueError, match="several crops of one plate"):
        model.embed(raw_images(1, 64))
    with pytest.raises(ValueError, match="virtual_batch_size must be positive"):
        GhostBatchNorm(4, virtual_batch_size=0)


# ------------------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------------------

def _site(exp, plate, address, gene, site=1):
    return Site(well_id=f"{exp}_{plate}_{address}", site=site, experiment=exp, plate=str(plate), address=address,
                perturbation=gene, channels=("1",))


def test_perturbation_labels_from_index():
    index = SiteIndex([_site("e1", 1, "A1", "TP53"), _site("e1", 1, "A2", "EMPTY_control"),
                       _site("e1", 2, "A1", "TP53"), _site("e2", 1, "B3", "ATM")])
    labels = PerturbationLabels.from_index(index)
    assert labels.classes == ("ATM", "EMPTY_control", "TP53") and len(labels) == 3
    names = [labels.classes[i] for i in labels.site_labels]
    assert names == [s.perturbation for s in index]
    class Info:  # a CropInfo's site_index
        site_index = np.array([3, 0, 0, 1])
    assert labels.for_crops(Info()).tolist() == [0, 2, 2, 1]
    fixed = PerturbationLabels.from_index(index, classes=("TP53", "ATM", "EMPTY_control"))
    assert fixed.for_crops(np.array([0, 3])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="not among the 2 classes"):
        PerturbationLabels.from_index(index, classes=("TP53", "ATM"))
    with pytest.raises(ValueError, match="no perturbation label .*well e1_1_A9"):
        PerturbationLabels.from_index(SiteIndex([_site("e1", 1, "A9", None)]))


# ------------------------------------------------------------------------------------------------------------
# plate sampler
# ------------------------------------------------------------------------------------------------------------

PLATES = ["p1"] * 23 + ["p2"] * 9 + ["p3"] * 3 + ["p1"] * 5 + ["p4"] * 17  # interleaved, odd sizes


def test_training_batches_are_full_single_plate_and_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="mae_fast.data"):
        s = PlateBatchSampler(PLATES, 4, train=True, seed=1)
    assert "1 plate(s) have fewer than batch_size=4" in caplog.text and s.never_sampled_plates == ["p3"]
    batches = list(s)
    assert len(batches) == len(s) == 28 // 4 + 9 // 4 + 17 // 4
    for b in batches:
        assert len(b) == 4 and len({PLATES[i] for i in b}) == 1 and s.plate_of(b) == PLATES[b[0]]
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)  # no item twice in an epoch
    assert list(PlateBatchSampler(PLATES, 4, train=True, seed=1)) == batches  # deterministic
    assert list(PlateBatchSampler(PLATES, 4, train=True, seed=2)) != batches
    s.set_epoch(1)
    assert list(s) != batches and len(list(s)) == len(batches)
    plates_in_order = [PLATES[b[0]] for b in batches]
    assert plates_in_order != sorted(plates_in_order)  # plates are interleaved across the epoch


def test_training_shards_are_disjoint_and_equal():
    full = list(PlateBatchSampler(PLATES, 4, train=True, seed=3))
    shards = [list(PlateBatchSampler(PLATES, 4, train=True, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(full) // 3
    assert sorted(b for s in shards for b in s) == sorted(full[: 3 * (len(full) // 3)])
    assert [len(PlateBatchSampler(PLATES, 4, rank=r, world_size=3)) for r in range(3)] == [len(shards[0])] * 3


def test_inference_covers_every_item_once_in_balanced_single_plate_batches():
    s = PlateBatchSampler(PLATES, 6, train=False, seed=0)
    batches = list(s)
    assert len(batches) == len(s)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(PLATES)))
    sizes = {}
    for b in batches:
        assert len({PLATES[i] for i in b}) == 1 and 1 <= len(b) <= 6
        sizes.setdefault(PLATES[b[0]], []).append(len(b))
    assert sizes == {"p1": [6, 6, 6, 5, 5], "p2": [5, 4], "p3": [3], "p4": [6, 6, 5]}
    # shuffled within the plate (spread over its wells), deterministically; in order with shuffle=False
    assert batches != [sorted(b) for b in batches] and list(PlateBatchSampler(PLATES, 6, train=False)) == batches
    ordered = list(PlateBatchSampler(PLATES, 6, train=False, shuffle=False))
    assert ordered[0] == [0, 1, 2, 3, 4, 5]
    shards = [list(PlateBatchSampler(PLATES, 6, train=False, rank=r, world_size=4)) for r in range(4)]
    assert sorted(i for sh in shards for b in sh for i in b) == list(range(len(PLATES)))
    assert [len(PlateBatchSampler(PLATES, 6, train=False, rank=r, world_size=4)) for r in range(4)] == \
        [len(sh) for sh in shards]


def test_sampler_from_index_with_crops_per_site_and_dataloader():
    index = SiteIndex([_site("e1", p, f"A{a}", "G") for p in (1, 2) for a in range(1, 6)])
    s = PlateBatchSampler.from_index(index, batch_size=4, repeat=3, train=False)
    plates = {(index[i // 3].experiment, index[i // 3].plate) for b in s for i in b}
    assert plates == {("e1", "1"), ("e1", "2")}
    for b in s:
        assert len({index[i // 3].plate for i in b}) == 1
    loader = torch.utils.data.DataLoader(list(range(30)), batch_sampler=s)
    assert sorted(int(v) for batch in loader for v in batch) == list(range(30))
    # training: per plate and epoch as many batches as a crop loader over that plate's sites alone
    from mae_fast.data.crops import TrainPlan

    sizes = {"1": 7, "2": 12, "3": 5}
    index = SiteIndex([_site("e", p, f"A{a}", "G") for p, n in sizes.items() for a in range(n)])
    train = PlateBatchSampler.from_index(index, batch_size=8, repeat=4, train=True, seed=1)
    per_plate = {}
    for b in train:
        per_plate[train.plate_of(b)[1]] = per_plate.get(train.plate_of(b)[1], 0) + 1
    assert per_plate == {p: TrainPlan(n, 8, 4, 2, 0, 0).steps for p, n in sizes.items()}


def test_balanced_sizes_and_sampler_errors():
    assert balanced_batch_sizes(13, 5) == [5, 4, 4] and balanced_batch_sizes(0, 5) == []
    assert balanced_batch_sizes(10, 5) == [5, 5] and balanced_batch_sizes(3, 8) == [3]
    with pytest.raises(ValueError, match="no plate-pure training batches"):
        PlateBatchSampler(["a"] * 3 + ["b"] * 3, 4, train=True)
    with pytest.raises(ValueError, match="rank"):
        PlateBatchSampler(PLATES, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        PlateBatchSampler([], 4)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        PlateBatchSampler(PLATES, 0)


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------

def test_bad_images_are_clear_errors():
    model = create_model("munet_micro_256", img_size=64)
    with pytest.raises(ValueError, match="expects 6 channels, got 5"):
        model(raw_images(2, 64, chans=5))
    with pytest.raises(ValueError, match="takes 64x64 crops .* got 32x32"):
        model.embed(raw_images(2, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.zeros(6, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scaled to \\[0, 1\\]"):
        model(torch.rand(2, 6, 64, 64) * 255)
    with pytest.raises(TypeError, match="uint8, uint16 or float"):
        model(torch.zeros(2, 6, 64, 64, dtype=torch.int16))
    with pytest.raises(ValueError, match="hides no patch"):
        model(raw_images(2, 64), mask_ratio=0.0)
    with pytest.raises(ValueError, match="channel-agnostic"):
        model.embed(raw_images(2, 64), per_channel=True)


def test_bad_labels_are_clear_errors():
    model = create_model("wsl_densenet_micro_256", img_size=64, num_classes=3)
    x = raw_images(2, 64)
    with pytest.raises(ValueError, match="call model\\(images, labels\\)"):
        model(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 3\]"):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\)"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\)"):
        model(x, torch.tensor([0, 1, 2]))
    headless = create_model("wsl_densenet_micro_256", img_size=64)
    with pytest.raises(ValueError, match="built without a classifier"):
        headless(x, torch.tensor([0, 1]))
    assert headless.eval().embed(x).shape == (2, 32)  # embedding-only use needs no classes


def test_every_preset_builds_and_is_registered():
    for name in list_models("baseline"):
        model = meta_model(name)
        assert isinstance(model, WSLClassifier if name.startswith("wsl") else MaskedUNet)
        assert model.cfg.name == name and model.cfg.family in ("wsl", "munet")
        assert name in list_models("baseline") and model_config(name).family != "mae"
    assert model_config("mae_vit_small_patch16_256").family == "mae"


@pytest.mark.parametrize("name", ["wsl_densenet_micro_adabn_256", "munet_micro_256"])
def test_checkpoint_round_trip_through_safetensors(name, tmp_path):
    import json

    from mae_fast.checkpoint import load_state_dict_strict, save_model, split_config
    from safetensors.torch import load_file

    model = create_model(name, img_size=64, **({"num_classes": 4} if name.startswith("wsl") else {}))
    model.train()(raw_images(4, 64), torch.tensor([0, 1, 2, 3]))  # move the running statistics off their init
    save_model(model.eval(), str(tmp_path))
    meta = json.load(open(tmp_path / "config.json"))
    assert meta["model_type"] == "mae_fast" and meta["family"] == model.cfg.family
    cfg, _ = split_config(meta)
    assert cfg == model.cfg
    again = create_model(cfg)
    load_state_dict_strict(again, load_file(str(tmp_path / "model.safetensors")), "test")
    x = raw_images(3, 64, seed=11)
    assert torch.equal(again.eval().embed(x), model.embed(x))

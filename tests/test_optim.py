import io
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from segexp.errors import ConfigError
from segexp.optim import build_optimizer, build_scheduler
from tests.conftest import CONF


class TinySegmentor(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                                      nn.Conv2d(4, 4, 1))
        self.decode_head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4),
                                         nn.Conv2d(4, 2, 1))


def groups_by_name(opt):
    return {g["name"]: g for g in opt.param_groups}


def ids(params):
    return {id(p) for p in params}


def sgd(model, **kw):
    kw = {"lr": 0.01, "weight_decay": 5e-4, "momentum": 0.9, **kw}
    return build_optimizer(model, type="torch.optim.SGD", **kw)


def test_no_decay_on_norm_and_bias_and_decay_on_conv_weights():
    m = TinySegmentor()
    g = groups_by_name(sgd(m, norm_bias_weight_decay=1e-5))
    b, h = m.backbone, m.decode_head
    assert ids(g["backbone"]["params"]) == {id(b[0].weight), id(b[2].weight)}
    assert ids(g["backbone_no_decay"]["params"]) == {id(b[1].weight), id(b[1].bias), id(b[2].bias)}
    assert ids(g["head"]["params"]) == {id(h[0].weight), id(h[2].weight)}
    assert ids(g["head_no_decay"]["params"]) == {id(h[0].bias), id(h[1].weight), id(h[1].bias),
                                                 id(h[2].bias)}
    assert g["backbone"]["weight_decay"] == g["head"]["weight_decay"] == 5e-4
    assert g["backbone_no_decay"]["weight_decay"] == g["head_no_decay"]["weight_decay"] == 1e-5
    assert g["backbone"]["momentum"] == 0.9


def test_named_parameters_can_be_kept_from_weight_decay():
    # Mask2Former's recipes: no decay on the learnt queries (2-D embeddings, decayed by default).
    m = TinySegmentor()
    m.decode_head.queries_features = nn.Embedding(3, 4)
    g = groups_by_name(sgd(m, no_decay_names=["queries_features"]))
    assert id(m.decode_head.queries_features.weight) in ids(g["head_no_decay"]["params"])
    assert id(m.decode_head[0].weight) in ids(g["head"]["params"])
    g = groups_by_name(sgd(m))
    assert id(m.decode_head.queries_features.weight) in ids(g["head"]["params"])


def test_head_lr_multiplier_and_frozen_params():
    m = TinySegmentor()
    for p in m.backbone[0].parameters():
        p.requires_grad_(False)
    opt = build_optimizer(m, type="torch.optim.AdamW", lr=6e-5, weight_decay=0.01,
                          head_lr_mult=10.0, betas=OmegaConf.create([0.9, 0.99]))
    g = groups_by_name(opt)
    assert g["head"]["lr"] == pytest.approx(6e-4) and g["head"]["lr_mult"] == 10.0
    assert g["backbone"]["lr"] == pytest.approx(6e-5) and g["backbone"]["lr_mult"] == 1.0
    all_ids = set().union(*(ids(x["params"]) for x in opt.param_groups))
    assert id(m.backbone[0].weight) not in all_ids
    assert len(all_ids) == sum(1 for p in m.parameters() if p.requires_grad)
    assert g["head"]["betas"] == (0.9, 0.99)  # a plain tuple, not a ListConfig
    # A scheduler keeps the 10x ratio at every step.
    sched = build_scheduler(opt, "poly", total_steps=10, power=1.0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert g["head"]["lr"] == pytest.approx(10 * g["backbone"]["lr"])


def test_unknown_optimizer_type_and_bad_options():
    with pytest.raises(ConfigError, match=r"optimizer.type=torch.optim.Sgdx"):
        build_optimizer(TinySegmentor(), type="torch.optim.Sgdx", lr=0.1)
    with pytest.raises(ConfigError, match=r"optimizer.type=nn.Linear"):
        build_optimizer(TinySegmentor(), type="nn.Linear", lr=0.1)
    with pytest.raises(ConfigError, match="optimizer.momentum=0.9"):
        build_optimizer(TinySegmentor(), type="torch.optim.Adam", lr=0.1, momentum=0.9)
    assert isinstance(build_optimizer(TinySegmentor(), type="adamw", lr=0.1), torch.optim.AdamW)


def run(sched, opt, steps, group=0):
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[group]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_poly_cosine_step_values_match_the_formulas():
    total, base = 20, 0.01
    opt = sgd(TinySegmentor(), lr=base)
    sched = build_scheduler(opt, "poly", total_steps=total, power=0.9, min_lr=1e-4)
    lrs = run(sched, opt, total + 1)
    for t in (0, 5, 13, 20):
        assert lrs[t] == pytest.approx((base - 1e-4) * (1 - t / total) ** 0.9 + 1e-4)
    opt = sgd(TinySegmentor(), lr=base)
    lrs = run(build_scheduler(opt, "cosine", total_steps=total, min_lr=1e-3), opt, total + 1)
    for t in (0, 7, 10, 20):
        cos = (1 + math.cos(math.pi * t / total)) / 2
        assert lrs[t] == pytest.approx(1e-3 + (base - 1e-3) * cos)
    opt = sgd(TinySegmentor(), lr=base)
    lrs = run(build_scheduler(opt, "step", total_steps=total, milestones=[0.5, 15]), opt, total)
    assert lrs[9] == pytest.approx(base) and lrs[10] == pytest.approx(base * 0.1)
    assert lrs[14] == pytest.approx(base * 0.1) and lrs[15] == pytest.approx(base * 0.01)
    opt = sgd(TinySegmentor(), lr=base)
    lrs = run(build_scheduler(opt, "step", total_steps=total, step_size=6, gamma=0.5), opt, total)
    assert [lrs[t] / base for t in (5, 6, 12, 18)] == pytest.approx([1, 0.5, 0.25, 0.125])


def test_min_lr_ratio_and_min_lr_above_lr():
    opt = sgd(TinySegmentor(), lr=0.01, head_lr_mult=10.0)
    lrs_head = run(build_scheduler(opt, "poly", total_steps=4, min_lr_ratio=0.1), opt, 5, group=2)
    assert lrs_head[-1] == pytest.approx(0.01)  # 10% of the head's 0.1
    opt = build_optimizer(TinySegmentor(), type="torch.optim.AdamW", lr=6e-5)
    with pytest.raises(ConfigError, match=r"scheduler.min_lr=0.0001 is above"):
        build_scheduler(opt, "poly", total_steps=10, min_lr=1e-4)


def test_warmup_starts_at_start_factor_and_reaches_lr():
    base, warm, total = 0.01, 5, 25
    opt = sgd(TinySegmentor(), lr=base)
    sched = build_scheduler(opt, "poly", total_steps=total, warmup_steps=warm,
                            warmup_start_factor=0.1, power=1.0)
    lrs = run(sched, opt, total + 1)
    assert lrs[0] == pytest.approx(0.1 * base)
    assert lrs[2] == pytest.approx(base * (0.1 + 0.9 * 2 / warm))
    assert lrs[warm] == pytest.approx(base)
    # Poly decays over the steps after warmup, reaching 0 exactly at total_steps.
    assert lrs[15] == pytest.approx(base * (1 - 10 / (total - warm)))
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert sched.interval == "iter" and sched.monitor is None


@pytest.mark.parametrize("name,opts", [("poly", {"min_lr": 1e-4}), ("cosine", {}),
                                       ("step", {"milestones": [12, 20]}),
                                       ("plateau", {"patience": 1})])
def test_resume_gives_the_same_lr_sequence(name, opts):
    def build():
        opt = sgd(TinySegmentor(), head_lr_mult=10.0)
        return opt, build_scheduler(opt, name, total_steps=30, warmup_steps=6, **opts)

    def step(opt, sched, i):
        opt.step()
        if name == "plateau":
            sched.step()
            sched.step(1.0 - 0.1 * (i < 3))
        else:
            sched.step()
        return [g["lr"] for g in opt.param_groups]

    opt, sched = build()
    straight = [step(opt, sched, i) for i in range(30)]
    opt, sched = build()
    first = [step(opt, sched, i) for i in range(10)]
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # how segexp checkpoints are read
    opt, sched = build()
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rest = [step(opt, sched, i) for i in range(10, 30)]
    assert first + rest == straight
    assert len({tuple(x) for x in straight}) > 3  # the schedule really moved


def test_plateau_reduces_after_patience_with_a_flat_metric():
    opt = sgd(TinySegmentor(), lr=0.01, head_lr_mult=10.0)
    sched = build_scheduler(opt, "plateau", total_steps=50, interval="epoch", patience=3,
                            factor=0.5, warmup_steps=2, warmup_start_factor=0.5)
    assert isinstance(sched, ReduceLROnPlateau)
    assert sched.interval == "epoch" and sched.monitor == "mIoU"
    lrs = [opt.param_groups[0]["lr"]]
    sched.step(0.1)  # a validation during the warmup does not count
    for _ in range(2):  # time ticks (epochs here) drive the warmup
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    sched.step()  # ticks after the warmup change nothing
    for _ in range(6):
        sched.step(0.5)
        lrs.append(opt.param_groups[0]["lr"])
    # Warmup: 0.005, 0.0075, 0.01; then a best at the 1st metric, 3 bad ones tolerated, cut at the 4th.
    assert lrs[:3] == pytest.approx([0.005, 0.0075, 0.01])
    assert lrs[3:7] == pytest.approx([0.01] * 4)
    assert lrs[7] == pytest.approx(0.005)
    # The head group is scaled the same way.
    assert sched.get_last_lr()[2] == pytest.approx(10 * lrs[-1])


@pytest.mark.parametrize("name,opts", [("poly", {"min_lr_ratio": 0.01}), ("cosine", {}),
                                       ("step", {"milestones": [0.5, 0.9]})])
@pytest.mark.parametrize("total", [60, 140], ids=["compressed", "stretched"])
def test_a_replanned_schedule_keeps_its_start_and_stretches_its_rest(name, opts, total):
    """A budget run planned over 100 iterations (lr held for the first 10) re-plans at 40: the lr
    up to 40 is the planned schedule's, the rest is the planned rest spread over the new length,
    reaching the same end (the floor) at the run's end."""
    planned, at, hold = 100, 40, 10
    opt = sgd(TinySegmentor())
    before = run(build_scheduler(opt, name, total_steps=planned, warmup_steps=hold,
                                 warmup_start_factor=1.0, **opts), opt, planned + 1)
    opt = sgd(TinySegmentor())
    after = run(build_scheduler(opt, name, total_steps=total, warmup_steps=hold,
                                warmup_start_factor=1.0, replanned_at=at, replanned_from=planned,
                                **opts), opt, total + 1)
    assert after[:at + 1] == pytest.approx(before[:at + 1], rel=1e-12)
    assert after[total] == pytest.approx(before[planned], rel=1e-12)  # the same end
    # Each later step stands where the planned schedule stood at the matching fraction of its rest.
    for step in (at + 1, (at + total) // 2, total - 1):
        t = at + (step - at) * (planned - at) / (total - at)
        assert before[math.ceil(t)] - 1e-12 <= after[step] <= before[math.floor(t)] + 1e-12
    assert after == sorted(after, reverse=True)  # never rises: no jump at the re-plan


def test_a_replan_that_does_not_describe_a_run_is_refused():
    opt = sgd(TinySegmentor())
    with pytest.raises(ConfigError, match="go together"):
        build_scheduler(opt, "poly", total_steps=50, replanned_at=20)
    with pytest.raises(ConfigError, match="not to this plateau"):
        build_scheduler(opt, "plateau", total_steps=50, replanned_at=20, replanned_from=40)
    with pytest.raises(ConfigError, match="scheduler.replanned_at=60 must lie"):
        build_scheduler(opt, "poly", total_steps=50, replanned_at=60, replanned_from=100)
    with pytest.raises(ConfigError, match="scheduler.replanned_at=5 must lie at or after the warmup"):
        build_scheduler(opt, "poly", total_steps=50, warmup_steps=10, replanned_at=5, replanned_from=100)


def test_bad_scheduler_options_are_config_errors():
    opt = sgd(TinySegmentor())
    with pytest.raises(ConfigError, match="scheduler.name=linear"):
        build_scheduler(opt, "linear", total_steps=10)
    with pytest.raises(ConfigError, match="power"):
        build_scheduler(opt, "cosine", total_steps=10, power=0.9)
    with pytest.raises(ConfigError, match="scheduler.warmup_steps=-1"):
        build_scheduler(opt, "poly", total_steps=10, warmup_steps=-1)
    with pytest.raises(ConfigError, match="scheduler.interval=step"):
        build_scheduler(opt, "poly", total_steps=10, interval="step")
    with pytest.raises(ConfigError, match="exactly one of scheduler.milestones"):
        build_scheduler(opt, "step", total_steps=10, milestones=[5], step_size=2)


def test_warmup_longer_than_the_run_shrinks_with_a_warning():
    # A recipe's 1500-step warmup in a 4-step smoke run: warm up over 3 steps, then decay.
    opt = sgd(TinySegmentor())
    with pytest.warns(UserWarning, match="warming up over 3"):
        sched = build_scheduler(opt, "poly", total_steps=4, warmup_steps=1500, power=1.0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] <= 0.01 + 1e-12


@pytest.mark.parametrize("path", sorted((CONF / "optimizer").glob("*.yaml")), ids=lambda p: p.stem)
def test_optimizer_yamls_instantiate(path):
    opt = instantiate(OmegaConf.load(path))(TinySegmentor())
    cfg = OmegaConf.load(path)
    assert type(opt).__name__ == cfg.type.rsplit(".", 1)[-1]
    g = groups_by_name(opt)
    assert g["backbone"]["lr"] == pytest.approx(cfg.lr)
    assert g["head"]["lr"] == pytest.approx(cfg.lr * cfg.head_lr_mult)
    assert g["backbone"]["weight_decay"] == pytest.approx(cfg.weight_decay)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


@pytest.mark.parametrize("path", sorted((CONF / "scheduler").glob("*.yaml")), ids=lambda p: p.stem)
def test_scheduler_yamls_instantiate(path):
    cfg = OmegaConf.load(path)
    opt = instantiate(OmegaConf.load(CONF / "optimizer" / "sgd.yaml"))(TinySegmentor())
    sched = instantiate(cfg)(opt, total_steps=100)
    assert sched.interval == cfg.interval
    assert sched.monitor == cfg.get("monitor")
    opt.step()
    sched.step(0.5) if sched.monitor else sched.step()
    assert opt.param_groups[0]["lr"] > 0


class _LayeredBackbone(nn.Module):
    """Three 'layers' (embedding, block, final norm) with the layer_id / num_layers contract."""

    num_layers = 5  # MMSegmentation counts its configured layers + 2

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 1)
        self.block = nn.Conv2d(4, 4, 1)

    def layer_id(self, name: str) -> int:
        return 0 if name.startswith("embed") else 3


class _Layered(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _LayeredBackbone()
        self.head = nn.Conv2d(4, 2, 1)


def test_layer_decay_scales_backbone_layers_and_leaves_heads():
    opt = build_optimizer(_Layered(), type="torch.optim.AdamW", lr=1.0, weight_decay=0.05,
                          layer_decay=0.9, head_lr_mult=2.0)
    lr_of = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lr_of["backbone_layer0"] == pytest.approx(0.9 ** 4)  # num_layers - 0 - 1
    assert lr_of["backbone_layer3"] == pytest.approx(0.9 ** 1)
    assert lr_of["backbone_layer0_no_decay"] == pytest.approx(0.9 ** 4)
    assert lr_of["head"] == pytest.approx(2.0)
    weight_decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert weight_decay["backbone_layer3"] == 0.05 and weight_decay["backbone_layer3_no_decay"] == 0


def test_layer_decay_needs_a_backbone_with_layers():
    model = nn.Module()
    model.backbone = nn.Conv2d(3, 4, 1)
    with pytest.raises(ConfigError, match="layer_decay=0.9: backbone"):
        build_optimizer(model, lr=0.1, layer_decay=0.9)


@pytest.mark.parametrize("kind", ["torch.optim.SGD", "torch.optim.AdamW"])
def test_fused_auto_picks_the_fused_kernel_where_one_exists(kind):
    from segexp import optim

    opt = build_optimizer(TinySegmentor(), type=kind, lr=0.01, fused="auto")
    assert opt.defaults["fused"] is True
    assert not build_optimizer(TinySegmentor(), type=kind, lr=0.01).defaults.get("fused")
    assert optim._fused_choice(torch.optim.LBFGS, list(TinySegmentor().parameters())) is None
    meta = list(TinySegmentor().to("meta").parameters())  # a device without fused kernels
    assert optim._fused_choice(getattr(torch.optim, kind.rsplit(".", 1)[1]), meta) is None
    # the fused step computes what the default one does
    torch.manual_seed(0)
    models = [TinySegmentor() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, type=kind, lr=0.01, weight_decay=1e-2, fused=f)
            for m, f in zip(models, ("auto", False))]
    x = torch.randn(2, 3, 8, 8)
    for model, opt in zip(models, opts):
        for _ in range(3):
            opt.zero_grad()
            model.decode_head(model.backbone(x)).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _official_eomt_lr_factors(backbone: nn.Module, decay: float) -> dict[str, float]:
    """EoMT's published rule, written as its code walks the encoder's parameters: in reverse
    order, a parameter in block i gets decay ** (L - 1 - i); those after the last block keep the
    lr; those before block 0 (the embeddings) get block 0's factor."""
    blocks = len(backbone.body.blocks)
    factors, block = {}, blocks
    for name, _ in reversed(list(backbone.named_parameters())):
        parts = name.split(".")
        in_block = "blocks" in parts
        if in_block:
            block = int(parts[parts.index("blocks") + 1])
        factors[name] = decay ** (blocks - 1 - block) if in_block or block == 0 else 1.0
    return factors


def test_eomt_layer_decay_rule_matches_the_official_rule():
    from segexp.models import build_model
    from tests.conftest import compose_config

    model = build_model(compose_config("model=eomt", "backbone=dinov2_reg_vits16", "+backbone.depth=4",
                                       "+backbone.embed_dim=48", "+backbone.num_heads=3",
                                       "head.num_blocks=2", "head.num_queries=5",
                                       "dataset.num_classes=3"), pretrained=False)
    opt = build_optimizer(model, type="torch.optim.AdamW", lr=1.0, weight_decay=0.05,
                          layer_decay=0.8, layer_decay_rule="eomt")
    lr_of_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    expected = _official_eomt_lr_factors(model.backbone, 0.8)
    assert {n for n, f in expected.items() if f == 1.0} >= {"body.norm.weight"}
    for name, param in model.backbone.named_parameters():
        if param.requires_grad:
            assert lr_of_param[id(param)] == pytest.approx(expected[name]), name
    assert min(lr_of_param.values()) == pytest.approx(0.8 ** 3)  # embeddings = block 0 of 4
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert head and all(lr_of_param[id(p)] == 1.0 for p in head)
    # The default rule (MMSegmentation's) differs exactly there: the last block one step down.
    mmseg = build_optimizer(model, type="torch.optim.AdamW", lr=1.0, layer_decay=0.8)
    last = {id(p): g["lr"] for g in mmseg.param_groups for p in g["params"]}
    assert last[id(model.backbone.body.blocks[3].mlp.fc1.weight)] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="layer_decay_rule=beit"):
        build_optimizer(model, lr=1.0, layer_decay=0.8, layer_decay_rule="beit")


def test_two_stage_warmup_matches_the_eomt_schedule():
    """EoMT's schedule: the new parameters warm up over w0 steps while the backbone stays at 0,
    the backbone warms up over the next w1, then each decays (poly 0.9) to 0 at the last step."""
    w0, w1, total, base = 4, 6, 30, 0.01
    opt = build_optimizer(TinySegmentor(), type="torch.optim.AdamW", lr=base, head_lr_mult=1.0)
    sched = build_scheduler(opt, "poly", total_steps=total, warmup_steps=w0,
                            backbone_warmup_steps=w1, warmup_start_factor=1e-6, power=0.9,
                            min_lr_ratio=None)
    names = [g["name"] for g in opt.param_groups]
    lrs = run(sched, opt, total + 1)  # the first group's lr per step
    per_group = []
    for step in range(total + 1):
        row = {}
        for name in names:
            if name.startswith("backbone"):
                row[name] = 0.0 if step < w0 else base * (step - w0) / w1 if step < w0 + w1 else \
                    base * (1 - (step - w0 - w1) / (total - w0 - w1)) ** 0.9
            else:
                row[name] = base * step / w0 if step < w0 else \
                    base * (1 - (step - w0) / (total - w0)) ** 0.9
        per_group.append(row)
    opt = build_optimizer(TinySegmentor(), type="torch.optim.AdamW", lr=base, head_lr_mult=1.0)
    sched = build_scheduler(opt, "poly", total_steps=total, warmup_steps=w0,
                            backbone_warmup_steps=w1, warmup_start_factor=1e-6, power=0.9,
                            min_lr_ratio=None)
    for step in range(total + 1):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(per_group[step][group["name"]], abs=1e-8), \
                (step, group["name"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and any(n.startswith("head") for n in names)
    with pytest.raises(ConfigError, match="not plateau"):
        build_scheduler(opt, "plateau", total_steps=total, backbone_warmup_steps=3)
    with pytest.warns(UserWarning, match="shrink in proportion"):
        build_scheduler(opt, "poly", total_steps=8, warmup_steps=5, backbone_warmup_steps=5)

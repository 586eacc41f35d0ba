"""Resume: a run checkpointed mid-way and resumed continues exactly like the uninterrupted one."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from vidssl.methods import MoCo, Optimization, SimCLR

pytestmark = pytest.mark.slow

EPOCHS, STOP_AFTER = 2, 1  # checkpoint after the first epoch of two


class _FixedViews(Dataset):
    """Deterministic float views (no augmentation randomness), 2 steps per epoch at batch 4."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        views = [torch.randn(3, 4, 16, 16, generator=g) for _ in range(2)]
        return {"views": views, "index": i, "label": i % 2}


class _Record(pl.Callback):
    def __init__(self):
        self.losses, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _model(name):
    torch.manual_seed(0)
    common = dict(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16})
    if name == "moco":
        return MoCo(queue_size=12, optim=Optimization(lr=0.1), **common)
    return SimCLR(optim=Optimization(optimizer="lars", lr=0.5, warmup_epochs=1), **common)


def _fit(model, tmp_path, ckpt_path=None):
    rec = _Record()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        callbacks=[rec, ckpt_cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    loader = DataLoader(_FixedViews(), batch_size=4, shuffle=False)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer, rec


@pytest.mark.parametrize("name", ["moco", "simclr"])
def test_resume_continues_exactly(name, tmp_path):
    full_trainer, full = _fit(_model(name), tmp_path)
    ckpt = next(tmp_path.glob(f"epoch={STOP_AFTER - 1}-*.ckpt"))
    model = _model(name)
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed_trainer, resumed = _fit(model, tmp_path / "resumed", ckpt_path=str(ckpt))

    steps_done = STOP_AFTER * 2
    assert len(resumed.losses) == len(full.losses) - steps_done
    assert torch.equal(torch.stack(resumed.losses), torch.stack(full.losses[steps_done:]))
    assert resumed.lrs == full.lrs[steps_done:]

    a, b = full_trainer.lightning_module.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = full_trainer.optimizers[0].state_dict()["state"]
    opt_b = resumed_trainer.optimizers[0].state_dict()["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for k in opt_a:
        assert torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"])
    if name == "moco":
        # The queue is saved in the checkpoint and filled on: 4 steps x 4 keys into 12 slots.
        assert "key_queue.keys" in a and "key_queue.ptr" in a
        assert b["key_queue.ptr"].item() == (EPOCHS * 2 * 4) % 12 == 4

"""PyTorch Lightning with a constrained optimizer: manual optimisation, one ``opt.step(closure)`` per batch.

The closure contract is unchanged under Lightning: it returns ``(loss, c)`` and calls neither
``self.manual_backward`` nor ``backward()``; Lightning passes the closure through to ``step`` and hands back
what ``step`` returns.
"""

import pytorch_lightning as pl
import torch

import sqpoptim


class ConstrainedODEFit(pl.LightningModule):
    """Fit u(t) to data while u' + u = 0 holds exactly at three points."""

    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.automatic_optimization = False  # the optimizer forms the gradients itself
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.register_buffer("t_c", torch.tensor([[0.25], [0.5], [0.75]]))

    def configure_optimizers(self):
        return sqpoptim.ProjectedAdamSQP(self.parameters(), lr=self.lr)

    def training_step(self, batch, batch_idx):
        t, u = batch
        opt = self.optimizers()

        def closure():
            loss = ((self.net(t) - u) ** 2).mean()
            # the constraints outside autocast, should the Trainer run with precision="bf16-mixed"
            with torch.autocast(self.device.type, enabled=False):
                t_c = self.t_c.clone().requires_grad_(True)
                v = self.net(t_c)
                dv = torch.autograd.grad(v.sum(), t_c, create_graph=True)[0]
                c = (dv + v).squeeze(1)
            return loss, c

        loss, c = opt.step(closure=closure)  # no self.manual_backward(loss)
        self.log_dict({"loss": loss, "max_abs_c": c.abs().max()}, prog_bar=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 20).unsqueeze(1)
    data = torch.utils.data.TensorDataset(t, torch.exp(-t) + 0.01 * torch.randn_like(t))
    trainer = pl.Trainer(max_epochs=300, logger=False, enable_checkpointing=False)
    trainer.fit(ConstrainedODEFit(), torch.utils.data.DataLoader(data, batch_size=20))
    print({k: f"{v.item():.1e}" for k, v in trainer.callback_metrics.items()})

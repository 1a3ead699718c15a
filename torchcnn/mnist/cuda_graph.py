"""A whole training step — forward, loss, backward, optimizer update — captured once in a CUDA graph
and replayed for every batch of the same shape (``train.py --cuda-graphs``): one launch per step
instead of one per kernel, which is most of a small model's step time on a GPU.

A replayed graph does exactly what it did when it was captured, on the same memory. This module
keeps everything it must stay true to in view, and refuses (RuntimeError) or steps eagerly where a
replay would silently train on something else:

- each batch is copied into the captured input tensors; a batch of another shape (an epoch's last,
  short one) and a model whose train/eval modes differ from the captured ones step eagerly;
- the optimizer's learning rate and Adam's β₁, which a schedule changes every step (OneCycleLR cycles
  β₁ too, unless told not to: train.py's --betas), live in device tensors that the update reads
  (Adam then takes its single-tensor update, the one that reads β₁ without a host read); a
  schedule's new Python value is copied in before each replay. Any other hyperparameter that
  changes after capture (β₂ included) is an error;
- parameters and optimizer state must stay the tensors that were captured: loading a state_dict into
  them in place is fine, replacing them (``optimizer.load_state_dict`` after capture) is an error.

Only optimizers whose update can run inside a graph take part: Adam, AdamW and Adadelta (with
``capturable=True``, which this class sets). A checkpoint of such an optimizer holds these device
hyperparameters; ``checkpoint.TrainingState`` saves them as plain numbers, so a run saved under
``--cuda-graphs`` resumes without it, on any device.
"""

from __future__ import annotations

import contextlib

import torch

# Optimizers whose step can be captured (their ``capturable`` option), by class.
CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adadelta)


class CudaGraph:
    """The graph a step is captured in: torch.cuda.CUDAGraph, its warm-up stream, and the outputs of
    the captured function (the same tensors after every replay)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graph = None
        self.outputs = None

    @contextlib.contextmanager
    def warmup(self):
        """Eager steps before capture run on a side stream, as CUDA graph capture requires."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def capture(self, fn) -> None:
        """Records ``fn()``'s kernels without running them."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self):
        self.graph.replay()
        return self.outputs


class GraphedTrainStep:
    """``step(images, labels) -> (logits, loss)``: one optimizer step on the batch, as

        optimizer.zero_grad(set_to_none=True)
        logits = model(images); loss = loss_fn(logits, labels); loss.backward(); optimizer.step()

    for the first ``warmup`` calls (real steps, which also let lazy initialisation happen outside
    the graph), then captured and replayed. The returned tensors are the graph's own outputs: read
    them (or clone them) before the next call overwrites them.

    ``graph`` is the capture mechanism, ``CudaGraph`` by default; the tests pass one whose "replay"
    calls the captured function again, to hold this class's bookkeeping to eager training on a CPU.
    """

    def __init__(self, model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, *, warmup: int = 3,
                 graph=None):
        if not isinstance(optimizer, CAPTURABLE):
            names = ", ".join(cls.__name__ for cls in CAPTURABLE)
            raise ValueError(f"GraphedTrainStep: optimizer {type(optimizer).__name__} cannot be captured in a CUDA "
                             f"graph (its update reads its learning rate on the host); use one of {names}")
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: expected warmup to be at least 1 but got {warmup}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"GraphedTrainStep: expected every parameter on one device but got {sorted(map(str, devices))}")
        self.device = devices.pop()
        if graph is None and self.device.type != "cuda":
            raise ValueError(f"GraphedTrainStep: CUDA graphs need the model on a CUDA device, not {self.device}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.warmup = warmup
        self.graph = CudaGraph(self.device) if graph is None else graph
        self.eager_steps = 0  # steps taken eagerly so far (warm-up and fallbacks)
        self.replays = 0
        self._captured = None  # what the graph was captured with: see _capture
        self._previous = None  # the shapes of the last batch before capture
        self._mirrors = [self._mirror(group) for group in optimizer.param_groups]

    def _mirror(self, group: dict) -> dict:
        """Puts the group's mirrored hyperparameters — the learning rate and Adam's β₁ — into device
        tensors (the same tensors from now on) and, on CUDA, makes its update capturable; returns the
        tensors by name. β₂ stays a number: only Adam's single-tensor update reads β₁ through tensor
        ops without a host read, and none reads β₂ so, hence ``foreach`` off for Adam."""
        if self.device.type == "cuda":
            group["capturable"] = True
            for p in group["params"]:  # capturable updates keep their step counts on the device
                state = self.optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(self.device, torch.float32)
        mirrors = {"lr": self._tensor(group["lr"])}
        group["lr"] = mirrors["lr"]
        if "betas" in group:
            group["foreach"] = False
            mirrors["beta1"] = self._tensor(group["betas"][0])
            group["betas"] = (mirrors["beta1"], float(group["betas"][1]))
        return mirrors

    def _tensor(self, value) -> torch.Tensor:
        return torch.tensor(float(value), dtype=torch.float32, device=self.device)

    @staticmethod
    def _fixed(group: dict) -> dict:
        """The group's hyperparameters that a replay holds fixed, by value."""
        def plain(value):
            if torch.is_tensor(value):
                return value.tolist()
            return tuple(plain(v) for v in value) if isinstance(value, (tuple, list)) else value

        fixed = {name: plain(value) for name, value in group.items() if name not in ("params", "lr", "betas")}
        if "betas" in group:
            fixed["betas[1]"] = plain(group["betas"][1])
        return fixed

    def _refresh_hyperparameters(self) -> None:
        """Copies what a schedule wrote into the groups since the last step into the device tensors
        the captured update reads, and refuses changes that a replay would ignore."""
        for i, (group, mirrors) in enumerate(zip(self.optimizer.param_groups, self._mirrors)):
            if group["lr"] is not mirrors["lr"]:  # schedulers fill a tensor lr in place; others assign
                mirrors["lr"].fill_(float(group["lr"]))
                group["lr"] = mirrors["lr"]
            if "beta1" in mirrors and group["betas"][0] is not mirrors["beta1"]:  # OneCycleLR assigns β₁
                mirrors["beta1"].fill_(float(group["betas"][0]))
                group["betas"] = (mirrors["beta1"], group["betas"][1])
            if self._captured is not None:
                now = self._fixed(group)
                for name, was in self._captured["hyperparameters"][i].items():
                    if now.get(name) != was:
                        raise RuntimeError(
                            f"GraphedTrainStep: param group {i}'s {name} changed from {was!r} to {now.get(name)!r} "
                            "after the step was captured, and a CUDA graph replays the captured value; set it "
                            "before the first step, or step eagerly")

    def _eager(self, images, labels):
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(images)
        loss = self.loss_fn(logits, labels)
        loss.backward()
        self.optimizer.step()
        self.eager_steps += 1
        return logits, loss

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _modes(self) -> tuple:
        return tuple(m.training for m in self.model.modules())

    def _tensors(self) -> list[int]:
        """The addresses of everything the captured step reads and writes besides its inputs."""
        addresses = []
        for p in self._params():
            addresses.append(p.data_ptr())
            addresses += [v.data_ptr() for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return addresses

    def _capture(self, images, labels) -> None:
        static_images, static_labels = images.clone(), labels.clone()

        def step():
            # No kernels: the backward then allocates the gradients inside the graph, and every
            # replay writes them afresh instead of adding to them.
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.model(static_images)
            loss = self.loss_fn(logits, static_labels)
            loss.backward()
            self.optimizer.step()
            return logits, loss

        self.graph.capture(step)
        self._captured = {
            "images": static_images, "labels": static_labels, "modes": self._modes(), "tensors": self._tensors(),
            "grads": [p.grad for p in self._params()],
            "hyperparameters": [self._fixed(group) for group in self.optimizer.param_groups],
        }

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        self._refresh_hyperparameters()
        if self._captured is None:
            # Captured once the warm-up is over, with a batch shaped like the one before (not an
            # epoch's short last batch, which would leave every full batch stepping eagerly).
            shapes, self._previous = self._previous, (images.shape, labels.shape)
            if self.eager_steps < self.warmup or shapes != self._previous:
                with self.graph.warmup():
                    return self._eager(images, labels)
            self._capture(images, labels)
        captured = self._captured
        if (images.shape != captured["images"].shape or labels.shape != captured["labels"].shape
                or images.dtype != captured["images"].dtype or labels.dtype != captured["labels"].dtype
                or self._modes() != captured["modes"]):
            return self._eager(images, labels)
        if self._tensors() != captured["tensors"]:
            raise RuntimeError("GraphedTrainStep: a parameter or an optimizer state tensor was replaced after the "
                               "step was captured (e.g. by optimizer.load_state_dict); a CUDA graph would go on "
                               "updating the old ones. Load state before the first step, or make a new "
                               "GraphedTrainStep")
        captured["images"].copy_(images)
        captured["labels"].copy_(labels)
        outputs = self.graph.replay()
        self.replays += 1
        # An eager fallback may have given the parameters gradients of their own: show the graph's.
        for p, grad in zip(self._params(), captured["grads"]):
            p.grad = grad
        return outputs

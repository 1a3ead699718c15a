"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a model converted by torchcnn.nn.convert,
beside the same torch.nn model: run by torchrun with two CPU processes (gloo) from test_convert.py.

The model is a Sequential, so convert fuses it (a Conv2dReLUMaxPool2d and a Conv2dReLU). Each rank
trains both models for a few SGD steps on its own half of the batch, every conv and dense layer
sharded across the ranks; rank 0 prints the two models' losses, the largest difference between
their final (gathered) parameters, and the converted model's layer classes as one JSON line.
"""

import gc
import json

import torch
import torch.distributed as dist

import torchcnn


def model() -> torch.nn.Sequential:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            fully_shard(layer)
    return fully_shard(model)


def train(model, loss_fn, images, labels, steps=4):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = model().double()
    converted = torchcnn.nn.convert(reference)
    gen = torch.Generator().manual_seed(1)
    batch = 2 * dist.get_world_size()
    images = torch.randn(batch, 1, 10, 10, generator=gen, dtype=torch.float64)[2 * rank:2 * rank + 2]
    labels = torch.randint(0, 10, (batch,), generator=gen)[2 * rank:2 * rank + 2]
    ours = train(sharded(converted), torchcnn.nn.CrossEntropyLoss(), images, labels)
    theirs = train(sharded(reference), torch.nn.CrossEntropyLoss(), images, labels)
    ours_kinds = (torchcnn.nn.Conv2d, torchcnn.nn.Conv2dReLU, torchcnn.nn.Conv2dReLUMaxPool2d, torchcnn.nn.MaxPool2d,
                  torchcnn.nn.ReLU, torchcnn.nn.Linear)
    left = sorted({type(m).__name__ for m in converted.modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.ReLU, torch.nn.Linear))
                   and not isinstance(m, ours_kinds)})  # FSDP2 subclasses each sharded layer's class
    difference = max((a.full_tensor() - b.full_tensor()).abs().max().item()
                     for a, b in zip(converted.parameters(), reference.parameters()))
    if rank == 0:
        print(json.dumps({"ours": ours, "theirs": theirs, "difference": difference, "unconverted": left,
                          "fused": sum(isinstance(m, (torchcnn.nn.Conv2dReLU, torchcnn.nn.Conv2dReLUMaxPool2d))
                                       for m in converted.modules())}), flush=True)
    # fully_shard's hooks put each sharded model in a reference cycle, so the models, and the
    # process group they hold, would outlive main() and be torn down during interpreter exit, where
    # gloo's threads abort the process ("terminate called without an active exception") on about
    # one run in eight under load. Collect them here, once every rank is past its last collective.
    dist.barrier()
    del converted, reference
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

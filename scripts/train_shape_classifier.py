"""Train the toy-world evaluator's shape classifier into sdlora/toyworld/shape_classifier.safetensors.

The evaluator names an object's shape from a crop around its coloured patch (sdlora.toyworld.evaluate). This
script renders scenes in the plain look, the demo's hatched look and random looks, spoils most of them with
`degrade` as a generating model would, finds the patches exactly as the evaluator does, and labels each by
its colour (a scene's objects have different colours). Held-out renders from another seed measure it.

Seeded and run on one thread, so a run gives the same weights on any machine with the same torch build: about
two and a half minutes on one core of a busy 2-core machine, most of it rendering.

Usage: python scripts/train_shape_classifier.py [--out PATH] [--renders N] [--epochs N] [--held-out N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
# Lets the script run from a checkout that was never pip-installed.
sys.path.insert(0, str(REPO))
from sdlora.toyworld.evaluate import LOOKS, WEIGHTS, ShapeNet, classifier_inputs, degrade, find_patches  # noqa: E402
from sdlora.toyworld.render import render  # noqa: E402
from sdlora.toyworld.scene import BACKGROUNDS, COLOURS, SHAPES, Scene, sample_object, sample_scene  # noqa: E402

CORNERS = ((0, 0), (2, 0), (0, 2), (2, 2))


def make_examples(renders: int, seed: int) -> dict[str, dict[str, list]]:
    """Patches and their shape labels from `renders` pictures, keyed by look, then by "clean"/"degraded"."""
    rng = random.Random(seed)
    examples = {look: {"clean": [], "degraded": []} for look in LOOKS}
    for i in range(renders):
        look = ("plain", "hatched", "random")[i % 3]
        scene = _scene(rng)
        image = render(scene, look=LOOKS[look](rng))
        condition = "clean"
        if rng.random() < 0.75:
            image, condition = degrade(image, rng, rng.uniform(0.0, 1.2)), "degraded"
        by_colour = {o.colour: o.shape for o in scene.objects}
        for patch in find_patches(image, max_objects=len(scene.objects) + 1):
            if patch.colour in by_colour:
                examples[look][condition].append((patch, SHAPES.index(by_colour.pop(patch.colour))))
    return examples


def _scene(rng: random.Random) -> Scene:
    """Half the time up to four objects in the corner cells, where even large ones never touch: four labelled
    patches for the price of one render. Otherwise a scene as the pretraining data samples them."""
    if rng.random() < 0.5:
        return sample_scene(rng)
    cells = rng.sample(CORNERS, rng.randint(2, 4))
    colours = rng.sample(list(COLOURS), len(cells))
    return Scene(tuple(replace(sample_object(rng), cell=c, colour=k) for c, k in zip(cells, colours)),
                 rng.choice(BACKGROUNDS), seed=rng.randrange(2**31))


def _flatten(examples: dict[str, dict[str, list]]) -> list:
    return [e for by_condition in examples.values() for group in by_condition.values() for e in group]


def train(pairs: list, epochs: int, seed: int) -> ShapeNet:
    torch.manual_seed(seed)
    net = ShapeNet()
    crops, scales = classifier_inputs([p for p, _ in pairs])
    labels = torch.tensor([label for _, label in pairs])
    steps_per_epoch = max(1, len(pairs) // 64)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        order = torch.randperm(len(pairs))
        for step in range(steps_per_epoch):
            idx = order[step * 64:(step + 1) * 64]
            x = crops[idx]
            # Every toy shape is mirror-symmetric, so a flipped crop is another true example.
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(net(x, scales[idx]), labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return net.eval()


def accuracy(net: ShapeNet, pairs: list) -> float:
    if not pairs:
        return float("nan")
    with torch.no_grad():
        predicted = net(*classifier_inputs([p for p, _ in pairs])).argmax(dim=1)
    return float((predicted == torch.tensor([label for _, label in pairs])).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--renders", type=int, default=1500, help="training pictures")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--held-out", type=int, default=600, help="pictures rendered to measure it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    pairs = _flatten(make_examples(args.renders, seed=args.seed))
    print(f"{len(pairs)} training patches from {args.renders} renders in {time.time() - start:.0f} s", flush=True)
    net = train(pairs, args.epochs, args.seed)
    held_out = make_examples(args.held_out, seed=args.seed + 1_000_003)
    print(f"held-out accuracy ({args.held_out} renders): all {accuracy(net, _flatten(held_out)):.1%}")
    for look, by_condition in held_out.items():
        print(f"  {look}: " + ", ".join(f"{condition} {accuracy(net, group):.1%} of {len(group)}"
                                        for condition, group in by_condition.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # No metadata: safetensors writes it in hash order, which would make two identical trainings differ.
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out))
    parameters = sum(p.numel() for p in net.parameters())
    print(f"{parameters} parameters, {args.out.stat().st_size} bytes -> {args.out} "
          f"({time.time() - start:.0f} s in all)")


if __name__ == "__main__":
    main()

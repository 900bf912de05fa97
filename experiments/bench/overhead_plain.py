"""The plain PyTorch loop that `overhead.py` compares `synaug fit` with: the same job in about 40 lines.

BreastMNIST at 28 px, ResNet-18 from scratch (timm), horizontal flips, Adam 1e-3, batch 64, validation
macro-F1 each epoch, the best epoch's weights tested once. Prints one JSON line: test acc and macro-F1.

    python experiments/bench/overhead_plain.py --npz ../shared/data/medmnist/breastmnist.npz --epochs 5
"""

import argparse
import copy
import json

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

p = argparse.ArgumentParser()
p.add_argument("--npz", required=True)
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed)
npz = np.load(args.npz)
split = {
    s: (
        torch.tensor(npz[f"{s}_images"]).float().div(255).unsqueeze(1).sub(0.5).div(0.5),
        torch.tensor(npz[f"{s}_labels"]).long().reshape(-1),
    )
    for s in ("train", "val", "test")
}
net = timm.create_model("resnet18", pretrained=False, num_classes=2, in_chans=1)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)


def predict(x):
    net.eval()
    with torch.no_grad():
        return torch.cat([net(b).argmax(1) for b in x.split(256)])


best, best_f1 = None, -1.0
x, y = split["train"]
for _ in range(args.epochs):
    net.train()
    for idx in torch.randperm(len(x)).split(64):
        if len(idx) < 2:  # batch norm cannot train on one image
            continue
        xb = x[idx]
        flip = torch.rand(len(idx)) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    f1 = f1_score(split["val"][1], predict(split["val"][0]), average="macro")
    if f1 > best_f1:
        best, best_f1 = copy.deepcopy(net.state_dict()), f1
net.load_state_dict(best)
pred = predict(split["test"][0])
yt = split["test"][1]
print(
    json.dumps(
        {"test/acc": (pred == yt).float().mean().item(), "test/f1_macro": f1_score(yt, pred, average="macro")}
    )
)

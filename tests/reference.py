"""Plain reference implementations used only to check the fast ones."""

import copy

import torch


def sparsegpt_reference(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """SparseGPT as the paper's pseudo-code (float64, full per-column updates)."""
    W = W.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(round(sparsity * rows * i2)) - int(round(sparsity * rows * i1))
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            mask1.view(-1)[torch.topk(tmp.flatten(), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                d1 = torch.diag(Hinv1)[i:i + prunem].reshape((1, -1))
                tmp = W1[:, i:i + prunem] ** 2 / d1**2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.float(), ~mask


def masked_copy(model, classes):
    """The model with every slice of the channel classes set to zero (running variances
    kept): what a shrunk model must compute."""
    m = copy.deepcopy(model)
    named = dict(m.named_parameters())
    named.update(dict(m.named_buffers()))
    with torch.no_grad():
        for c in classes:
            for p, d, i in c.slices:
                if not p.endswith("running_var"):
                    named[p].select(d, i).zero_()
    return m

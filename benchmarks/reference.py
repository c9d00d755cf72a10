"""Published student accuracies (%) from the CMI paper (Fang et al., IJCAI 2021) and its
benchmark code's README, and from Fast-DFKD (Fang et al., AAAI 2022, its Fast-2 preset),
keyed like our results so a table can show them side by side."""
from __future__ import annotations

# Rows are the tables' labels: a method's label is its class's `display` name (methods/).
BASELINE_ROWS = ("T. Scratch", "S. Scratch")

_PAIRS = [("resnet34", "resnet18"), ("vgg11", "resnet18"), ("wrn40_2", "wrn16_1"),
          ("wrn40_2", "wrn40_1"), ("wrn40_2", "wrn16_2")]

_CIFAR10 = {
    "T. Scratch": [95.70, 92.25, 94.87, 94.87, 94.87],
    "S. Scratch": [95.20, 95.20, 91.12, 93.94, 93.95],
    "DAFL": [92.22, 81.10, 65.71, 81.33, 81.55],
    "ZSKT": [93.32, 89.46, 83.74, 86.07, 89.66],
    "DeepInv": [93.26, 90.36, 83.04, 86.85, 89.72],
    "DFQ": [94.61, 90.84, 86.14, 91.69, 92.01],
    "CMI": [94.84, 91.13, 90.01, 92.78, 92.52],
    # Fang et al., AAAI 2022 (Fast-DFKD), its preset Fast-2 (2 steps per batch)
    "Fast": [92.62, 84.67, 88.36, 89.56, 89.68],
}
_CIFAR100 = {
    "T. Scratch": [78.05, 71.32, 75.83, 75.83, 75.83],
    "S. Scratch": [77.10, 77.01, 65.31, 72.19, 73.56],
    "DAFL": [74.47, 57.29, 22.50, 34.66, 40.00],
    "ZSKT": [67.74, 34.72, 30.15, 29.73, 28.44],
    "DeepInv": [61.32, 54.13, 53.77, 61.33, 61.34],
    "DFQ": [77.01, 68.32, 54.77, 62.92, 59.01],
    "CMI": [77.04, 70.56, 57.91, 68.88, 68.75],
    "Fast": [69.76, 62.83, 41.77, 53.15, 57.08],
}

PUBLISHED: dict[str, dict[tuple[str, str], dict[str, float]]] = {
    name: {pair: {row: values[i] for row, values in table.items()} for i, pair in enumerate(_PAIRS)}
    for name, table in (("cifar10", _CIFAR10), ("cifar100", _CIFAR100))
}


def published(dataset: str, teacher: str, student: str, row: str) -> float | None:
    """The published number for a table row ("CMI", "T. Scratch", ...), or None."""
    return PUBLISHED.get(dataset, {}).get((teacher, student), {}).get(row)

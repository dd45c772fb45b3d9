"""tfcapacity: experiments on why big and deep networks are hard to optimise.

The data flows flags -> data + model -> training loop (+ measurement callbacks)
-> run directory (TensorBoard events, checkpoints, results.json, SavedModel).
"""

__version__ = "0.1.0"

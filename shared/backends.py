"""The multi-LoRA kernel families: ``bgmv`` pads every request to the batch's max rank, ``mbgmv`` does not.

``auto`` (a worker's default) lets the worker's own profile choose: once it has a profile of
each family, it serves with the family whose model predicts the lower cost per output token
for its served ranks (``services/gpu_worker/profiling/backend_choice.py``). Until then it runs
``AUTO_START``: mbgmv never pads, so its cost never depends on the batch's largest rank.
"""

BACKENDS = ("bgmv", "mbgmv")
AUTO = "auto"
BACKEND_CHOICES = (*BACKENDS, AUTO)
AUTO_START = "mbgmv"


def starting_backend(backend: str) -> str:
    """The family an engine configured with ``backend`` starts on (``auto``: ``AUTO_START``)."""
    return AUTO_START if backend == AUTO else backend

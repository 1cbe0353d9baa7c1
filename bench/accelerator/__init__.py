"""The one-shot accelerator check: Triton LoRA kernels validated and timed against the torch path,
then the engine bench's own configurations on the device; one JSON and one PNG named after the device.
Imports services and bench.engine; nothing imports it.
"""

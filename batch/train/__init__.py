"""Training data and LoRA training, apart from the runner.

prepare.py     a folder of images (+ captions) -> a training folder (`sdbatch prepare-dataset`)
dataset.py     reading and checking a training folder; buckets and the order of batches
lora.py        the LoRA training loop on accelerate + peft (`sdbatch train-lora`)
export.py      the trained adapter in diffusers and kohya/A1111 formats
validation.py  validation images through sdbatch's own runner, and their HTML page
"""

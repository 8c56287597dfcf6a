"""Run by test_multiprocess.py: train a few steps, then each process writes its trained UNet."""

import sys

from accelerate import PartialState
from safetensors.torch import save_file

from dreamtune.config import load_config
from dreamtune.training import train

model, subject, out, per_process_batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
bucketing = sys.argv[5:] == ["bucketed"]
config = load_config(
    None, pretrained_model_name_or_path=model, output_dir=out, resolution=32, max_train_steps=3,
    train_batch_size=per_process_batch, learning_rate=1e-3, adam_epsilon=1e-3, validation_steps=0, checkpointing_steps=0,
    num_validation_images=1, validation_inference_steps=1, validation_prompts=["a photo of sks dog"],
    with_prior_preservation=True, num_class_images=3, class_generation_steps=1,
    concepts=[{"instance_data_dir": subject, "class_noun": "dog"}],
    bucketing=bucketing, bucket_step=8, center_crop=not bucketing, random_flip=bucketing,
)
result = train(config, progress=False)
rank = PartialState().process_index
save_file({k: v.contiguous() for k, v in result.pipeline.unet.state_dict().items()}, f"{out}/../rank{rank}.safetensors")

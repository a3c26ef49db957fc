"""Training for genflow's model families: data sets, networks, the trainer and its checkpoints.

    from genflow.train import load_dataset, MLP, TrainConfig, train
    data = load_dataset("moons", n=10000, seed=0)
    family = make_family("flow-matching", data_shape=data.data_shape)
    result = train(family, data, TrainConfig(steps=2000, batch_size=256), checkpoint_dir="runs/moons")
"""
from genflow.train import classic, families, objectives, sd_generator  # importing a module registers its families
from genflow.checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from genflow.train.data import TOY_SETS, Dataset, available_datasets, load_dataset, toy_sample
from genflow.train.families import FAMILIES, Family, make_family, reflow_pairs, register_family
from genflow.train.nets import MLP, UNet, time_embedding
from genflow.train.trainer import EMA, TrainConfig, TrainResult, learning_rate, sample_plotter, sample_seeds, train

__all__ = [
    "EMA", "FAMILIES", "MLP", "TOY_SETS", "CheckpointError", "Dataset", "Family", "TrainConfig", "TrainResult", "UNet",
    "available_datasets", "classic", "families", "make_family", "objectives", "reflow_pairs", "register_family", "learning_rate", "load_checkpoint", "load_dataset", "load_latest", "sample_plotter",
    "sample_seeds", "save_checkpoint", "sd_generator", "time_embedding", "toy_sample", "train",
]

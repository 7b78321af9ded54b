"""A tiny text-to-image diffusion model trained on scikit-learn's 8x8 digits.

The default model that ``forgetscore demo`` attributes, and the model that the
leave-K-out evaluation retrains.  See the module docstrings for the choices.
"""
from .data import DIGIT_WORDS, VOCABULARY, DigitsData, load_data, write_image_folder
from .model import DigitsModel, ModelConfig, build_model, cross_attention_kv_names, load_model, save_model
from .tokenizer import build_tokenizer
from .train import RECIPES, TrainRecipe, default_model_dir, ensure_model, load_default_model
from .train import train as train_model  # the submodule keeps the name ``train``

__all__ = [
    "DIGIT_WORDS", "VOCABULARY", "DigitsData", "load_data", "write_image_folder",
    "DigitsModel", "ModelConfig", "build_model", "cross_attention_kv_names", "load_model", "save_model",
    "build_tokenizer", "RECIPES", "TrainRecipe", "default_model_dir", "ensure_model", "load_default_model",
    "train_model",
]

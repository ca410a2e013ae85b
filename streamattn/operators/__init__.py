"""Mergeable operators (sketches). Each module holds one algorithm family."""

from streamattn.operators.frequent_directions import FDSketch, FDSpec, FrequentDirections
from streamattn.operators.ground_truth import (
    GroundTruth,
    GroundTruthSpec,
    ObservedAttentionSpec,
    ObservedAttentionTop,
    RestrictedAttention,
    RestrictedAttentionSpec,
)
from streamattn.operators.leverage import LeverageScores, LeverageSpec, TopScores, TopScoresSpec
from streamattn.operators.protocol import Operator, RowRanges, State
from streamattn.operators.sampler import LeverageSampler, SamplerSpec

__all__ = [
    "FDSketch",
    "FDSpec",
    "FrequentDirections",
    "GroundTruth",
    "GroundTruthSpec",
    "LeverageSampler",
    "LeverageScores",
    "LeverageSpec",
    "ObservedAttentionSpec",
    "ObservedAttentionTop",
    "Operator",
    "RestrictedAttention",
    "RestrictedAttentionSpec",
    "RowRanges",
    "SamplerSpec",
    "State",
    "TopScores",
    "TopScoresSpec",
]

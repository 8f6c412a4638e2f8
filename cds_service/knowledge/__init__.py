"""Knowledge layer: every code, number and rule fact the service uses, as reviewed data.

The JSON files under ``data/`` are validated against ``schemas/knowledge.schema.json`` and
cross-checked at load time; ``default_knowledge()`` loads them once per process.
"""

from cds_service.knowledge.index import Knowledge
from cds_service.knowledge.loader import DATA_DIR, default_knowledge, load_knowledge
from cds_service.knowledge.model import (
    ConditionGroup,
    DrugGroup,
    EvidenceSource,
    Ingredient,
    Interaction,
    KnowledgeError,
    MagnesiumMatch,
    RuleInfo,
    Threshold,
    ThresholdBand,
)

__all__ = [
    "DATA_DIR",
    "ConditionGroup",
    "DrugGroup",
    "EvidenceSource",
    "Ingredient",
    "Interaction",
    "Knowledge",
    "KnowledgeError",
    "MagnesiumMatch",
    "RuleInfo",
    "Threshold",
    "ThresholdBand",
    "default_knowledge",
    "load_knowledge",
]

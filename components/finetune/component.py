from kfp import dsl

from cycleqd_kfp.components.runtime import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def finetune(campaign_config: str, store_uri: str, skill: str, tracking_uri: str) -> str:
    """Fine-tune one skill's expert from the campaign's base and publish it in the campaign
    store (genome record and task-vector factors), for the archives to be seeded from.

    The skill's training data is its fine-tuning spec's chat JSONL, or its derived training
    part (built once, kept in the store). A retried or rerun task resumes from the last
    checkpoint in the store and publishes the same bytes; a published expert is never
    trained again.

    Args:
        campaign_config: The campaign config (YAML); `models.experts.<skill>` is the spec.
        store_uri: The campaign store (s3://bucket/prefix).
        skill: The skill whose expert to fine-tune (one of preflight's `experts`).
        tracking_uri: MLflow tracking URI for the training run; empty: no tracking.

    Returns:
        The published expert as JSON: uri, sha256, genome id, steps, losses, throughput.
    """
    import json

    from cycleqd import steps

    return json.dumps(steps.train_expert(campaign_config, store_uri, skill, tracking_uri))

from kfp import dsl

from cycleqd_kfp.components.runtime import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def finetune(campaign_config: str, store_uri: str, skill: str, tracking_uri: str) -> str:
    """Fine-tune one skill's expert from the campaign's base and publish it in the store.

    The expert is published with its genome record and task-vector factors, for the archives
    to be seeded from. Its training data is its fine-tuning spec's chat JSONL, or the skill's
    derived training part (built once, kept in the store). A retried or rerun task resumes
    from the last checkpoint in the store and publishes the same bytes; a published expert is
    never trained again.

    Args:
        campaign_config: The campaign config (see the README's "Configuration"): a YAML
            document, one-line JSON, or a config file's URI (s3://, https://, a path);
            its `models.experts.<skill>` is the fine-tuning spec.
        store_uri: The campaign store: s3://bucket/prefix, or a folder where the task runs.
        skill: The skill whose expert to fine-tune (one of those preflight returns).
        tracking_uri: MLflow tracking URI for the training run; empty: no tracking.

    Returns:
        Output: The published expert (JSON): skill, URI, sha256, genome id, whether it was
            reused, and for a trained one its steps, final loss and throughput.
    """
    import json

    from cycleqd import steps

    return json.dumps(steps.train_expert(campaign_config, store_uri, skill, tracking_uri))

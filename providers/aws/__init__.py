"""AWS adapters, boto3 imported only when first used: ``type: aws`` rents one EC2 GPU instance per
job (on-demand or spot); ``type: aws_pool`` sends inference to an Auto Scaling Group kept warm.

Credentials come only from the normal boto3 chain (environment, ``profile``, instance role);
a config holding keys is refused, and no message carries them.

``aws`` config keys:
    regions               region codes to launch in (default ["us-east-1"])
    image_id              AMI id for every region, or {region: AMI id}; regions without one are skipped
    instance_types        our price catalog: {type: {gpu, gpu_count, gpu_memory_gb (per GPU),
                          on_demand: {region: $/h}, spot: {region: $/h}}}
    use_spot              offer spot capacity when a job allows interruptible (default true)
    refresh_spot_prices   refresh catalog spot prices from describe_spot_price_history (default false),
                          cached for spot_price_ttl seconds (default 300)
    subnet_id             a subnet, or {region: subnet} (a map when there are several regions)
    security_group_ids    a list, or {region: [ids]} (a map when there are several regions)
    key_name, iam_instance_profile, root_volume_gb   optional launch settings
    provisioning_timeout  seconds an instance may stay pending (default 600)
    kinds                 job kinds run from a command (default [command, training]); inference and
                          transcription are offered only to specs that carry a command
    default_command       command for specs without one
    max_instances         capacity each offer advertises (default 8)
    spot_reliability      reliability placement sees for spot offers (default 0.9)
    endpoint_url, profile, retry (3), max_retry_wait (5), request_timeout (30), not_found_grace (60)

``aws_pool`` config keys: see ``providers.aws.pool``.
"""

from providers.aws.pool import AWSPoolProvider
from providers.aws.provider import AWSProvider

__all__ = ["AWSPoolProvider", "AWSProvider"]

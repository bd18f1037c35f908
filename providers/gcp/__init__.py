"""Google Cloud adapters (registry types ``gcp`` and ``gcp_pool``) on google-cloud-compute's REST
transport; the SDK is imported only when a client is first needed.

``gcp`` — one GPU VM per job, spot or on-demand (``GCPProvider``):

- ``project`` (required), ``zones`` (required list, e.g. ``[us-central1-a, europe-west4-a]``).
- ``machine_types`` (required): ``{name: {gpu, gpu_count, gpu_memory_gb, accelerator_type, on_demand: {zone|region|"*": $/h},
  spot: {…}}}``. A type is offered where it has a price, as an on-demand and/or a spot offer.
  ``accelerator_type`` (``nvidia-tesla-t4``, ``nvidia-l4``…) is attached as guestAccelerators;
  A2/A3/G2 types, whose GPUs are built in, may leave it out.
- ``image`` (boot image, default a Deep Learning VM CUDA family), ``disk_gb`` (100), ``network``
  (``global/networks/default``), ``kinds`` (``[training, command]``), ``default_command``.
- ``provisioning_timeout`` (600 s), ``operation_wait`` (how long reserve follows the insert
  operation, 20 s), ``request_timeout`` (30 s per call), ``retry_seconds`` (5 s of retries of 5xx
  on calls safe to repeat), ``page_size`` (500).
- Credentials: ``google.auth.default()`` (GOOGLE_APPLICATION_CREDENTIALS, gcloud ADC, metadata
  server), or ``credentials_file`` (a service-account JSON path), or ``anonymous: true`` with
  ``api_endpoint`` (``http://127.0.0.1:PORT``: a local emulator, tests only).

The VM is named after the reservation label and carries it as label ``gpufleet-label`` (and
exactly in metadata), so the reaper finds it; its ``startup-script`` exports the job's env
(including GPUFLEET_JOB_TOKEN, visible to project members who can read instance metadata) and
runs the gpufleet wrapper, which reports to GPUFLEET_CALLBACK_URL. Spot VMs are created with
instanceTerminationAction DELETE, so a preempted VM disappears and the job fails over.

``gcp_pool`` — a Managed Instance Group of model servers as a warm pool (``GCPPoolProvider``):

- ``project``, ``zone``, ``instance_group_manager`` (required); ``min_size`` (0), ``max_size`` (1).
- ``endpoint`` (one URL fronting the members, e.g. an internal load balancer) or ``member_url``
  (a template with ``{name}``, ``{zone}``, ``{project}``); exactly one.
- ``member_concurrency`` (4 requests per member), ``price_per_hour`` (one member), ``gpu``,
  ``gpu_count``, ``gpu_memory_gb``, ``region`` (default the zone), ``kinds`` (``[inference]``,
  may add ``transcription``), ``models``, ``secret_env``, ``timeout`` and the ``pool`` adapter's
  pricing keys (``price_per_1k_tokens``, ``assumed_tokens_per_second``).
- ``scale_down_idle_seconds`` (600), ``scale_cooldown_seconds`` (120): see ``autoscale``.
- Same credential and endpoint keys as ``gcp``.
"""

from providers.gcp.pool import GCPPoolProvider
from providers.gcp.provider import GCPProvider

__all__ = ["GCPPoolProvider", "GCPProvider"]

#!/usr/bin/env bash
# Register a registry, the docker image builder and step operator and a stack with the CLI, then
# run examples/docker/pipeline.py with `train` in a container. Needs dockerd, a registry on
# 127.0.0.1:5000 and the stepflow-base:py3.11 image: `bash scripts/services.sh` provides them.
set -euo pipefail
cd "$(dirname "$0")/../.."
SF=${STEPFLOW:-stepflow}

$SF container-registry register local_registry --type=default --uri=127.0.0.1:5000/stepflow-examples 2>/dev/null \
  || echo "container-registry local_registry already registered"
$SF image-builder register docker_builder --type=docker 2>/dev/null || echo "image-builder docker_builder already registered"
$SF step-operator register docker --type=docker --base_image=stepflow-base:py3.11 2>/dev/null \
  || echo "step-operator docker already registered"
$SF stack register docker_stack -o local -a default -c local_registry -i docker_builder -s docker -s local 2>/dev/null \
  || echo "stack docker_stack already registered"
$SF stack set docker_stack
$SF run examples.docker.pipeline:training "$@"

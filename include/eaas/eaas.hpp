#pragma once

/// Everything a host program needs: configuration, statuses, the host objects and the op vocabulary.
/// Device code needs only `eaas/device/ops.hpp`.

#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"
#include "eaas/common/views.hpp"
#include "eaas/config.hpp"
#include "eaas/device/ops.hpp"
#include "eaas/host/context.hpp"
#include "eaas/host/directory.hpp"
#include "eaas/host/endpoint.hpp"
#include "eaas/host/error.hpp"
#include "eaas/host/handle.hpp"
#include "eaas/host/ibgda.hpp"
#include "eaas/host/memory.hpp"
#include "eaas/host/registry.hpp"
#include "eaas/host/topology.hpp"

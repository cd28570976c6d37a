// The head dims with kernels: the one list. Both dialects instantiate every head-dim template
// for each entry (kernels/cuda/flash_common.cuh, kernels/metal/flash_metal.h), and flash-ops
// parses this very line at compile time (src/plan/head_dims.rs) for its launch plans, which run
// a problem on the smallest entry >= its head_dim (extra columns zero-filled).
//
// FLASH_HEAD_DIMS(X, args...) expands to X(d, args...) for every d. Keep the list on the one
// line below, ascending, each a multiple of 16 (the tile products' k-step).
#pragma once
#define FLASH_HEAD_DIMS(X, ...) X(32, __VA_ARGS__) X(64, __VA_ARGS__) X(96, __VA_ARGS__) X(128, __VA_ARGS__) X(256, __VA_ARGS__)

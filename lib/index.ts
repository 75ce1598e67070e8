/**
 * trimkv: TRIM-KV (learned token retention for a memory-bounded KV cache) for Node.js.
 * @packageDocumentation
 */
export { backends, buildInfo, openRuntime, Runtime, FORCE_CPU_ENV } from './runtime.js';
export { Tensor } from './tensor.js';
export { gateSupport, RetentionGate } from './gate.js';
export { cacheSupport, KVCache, resolveCacheConfig, type ResolvedCacheConfig } from './cache.js';
export { TrimKVError, type ErrorCode } from './errors.js';
export {
  ACTIVATIONS, CUDA_GATE_INPUT_MULTIPLE, CUDA_HEAD_DIM_MULTIPLE, CUDA_MAX_HEAD_DIM, DTYPES, FAST_HEAD_DIMS, GATE_KINDS,
  MAX_HEAD_DIM, SCOPES, STRATEGIES,
} from './constants.js';
export type * from './types.js';
export {
  loadCheckpoint,
  loadCheckpointSync,
  parseCheckpoint,
  encodeSafetensors,
  readSafetensors,
  readTorchStateDict,
  type Checkpoint,
  type CheckpointCacheDefaults,
  type LoadCheckpointOptions,
  type SafetensorsFile,
  type TorchStateDict,
} from './checkpoint/index.js';
// Model directories and tokenizers (groundwork for `trimkv generate`; no forward pass yet).
export {
  checkGatesAgainstModel,
  loadGenerationConfig,
  loadModelConfig,
  MODEL_ARCHITECTURES,
  parseGenerationConfig,
  parseModelConfig,
  ropeAttentionScaling,
  ropeCosSin,
  ropeFactorSet,
  ropeInvFreq,
  type GenerationConfig,
  type ModelArchitecture,
  type ModelConfig,
  type RopeScaling,
} from './model/config.js';
export {
  checkModelTensors,
  expectedModelTensors,
  MAX_SAFETENSORS_HEADER_BYTES,
  openModelWeights,
  readSafetensorsHeader,
  type ModelTensorCheck,
  type ModelWeights,
  type SafetensorsHeader,
  type TensorInfo,
} from './model/weights.js';
export {
  loadTokenizer,
  ModelTokenizer,
  type ChatMessage,
  type ChatTemplateOptions,
  type DecodeOptions,
  type DecodeStream,
  type EncodeOptions,
} from './model/tokenizer.js';

;; The minimal Model ABI v1 module of models/ABI.md ("A minimal module").
;; identity.wasm beside it is this file compiled: wat2wasm identity.wat (Debian: apt-get install wabt).
(module
  (memory (export "memory") 4)
  (data (i32.const 0) "\00\04\00\00")   ;; next free address: 1024
  (data (i32.const 16) "{\22name\22:\22identity\22,\22version\22:\221.0.0\22}")
  (func (export "ef_abi_version") (result i32) (i32.const 1))
  (func (export "ef_alloc") (param $size i32) (result i32)
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (local.get $size)))
    (i32.sub (i32.load (i32.const 0)) (local.get $size)))
  (func (export "ef_infer") (param $in i32) (param $len i32) (param $out i32) (param $cap i32) (result i32)
    (if (i32.gt_u (local.get $len) (local.get $cap)) (then (return (i32.const -2))))
    (memory.copy (local.get $out) (local.get $in) (local.get $len))
    (i32.store8 offset=10 (local.get $out) (i32.const 121))   ;; the name "x" becomes "y"
    (local.get $len))
  (func (export "ef_last_error") (param i32 i32) (result i32) (i32.const 0))
  (func (export "ef_metadata") (param $out i32) (param $cap i32) (result i32)
    (memory.copy (local.get $out) (i32.const 16) (i32.const 37))
    (i32.const 37)))

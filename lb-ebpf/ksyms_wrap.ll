; ModuleID = 'ksyms_wrap'
; From docs: /work/shared/notes/xdp-conntrack.md (verified on 6.18). Linked into the balancer by build.rs.
; Order-independent variant: Rust calls sluice_ct_lookup/sluice_ct_release (plain externs it never
; sees as kfuncs); this module defines them as always-inline wrappers around the kfuncs, declared
; the way clang declares `__ksym` externs (section ".ksyms" + a DISubprogram -> BTF FUNC extern in
; DATASEC .ksyms). Can be the last linker input, e.g. from build.rs `cargo::rustc-link-arg`.
target datalayout = "e-m:e-p:64:64-i64:64-i128:128-n32:64-S128"
target triple = "bpfel"

declare !dbg !10 ptr @bpf_xdp_ct_lookup(ptr, ptr, i32, ptr, i32) section ".ksyms"
declare !dbg !30 void @bpf_ct_release(ptr) section ".ksyms"

define ptr @sluice_ct_lookup(ptr %ctx, ptr %tuple, i32 %tuple_sz, ptr %opts, i32 %opts_sz) #0 {
  %ct = call ptr @bpf_xdp_ct_lookup(ptr %ctx, ptr %tuple, i32 %tuple_sz, ptr %opts, i32 %opts_sz)
  ret ptr %ct
}

define void @sluice_ct_release(ptr %ct) #0 {
  call void @bpf_ct_release(ptr %ct)
  ret void
}

attributes #0 = { alwaysinline nounwind "target-cpu"="generic" }

!llvm.dbg.cu = !{!0}
!llvm.module.flags = !{!2, !3}
!0 = distinct !DICompileUnit(language: DW_LANG_C99, file: !1, producer: "ksyms shim", isOptimized: true, runtimeVersion: 0, emissionKind: FullDebug, splitDebugInlining: false, nameTableKind: None)
!1 = !DIFile(filename: "ksyms_wrap.ll", directory: "/")
!2 = !{i32 7, !"Dwarf Version", i32 4}
!3 = !{i32 2, !"Debug Info Version", i32 3}
!4 = !DIBasicType(name: "u32", size: 32, encoding: DW_ATE_unsigned)
!5 = !{}
!10 = !DISubprogram(name: "bpf_xdp_ct_lookup", scope: !1, file: !1, line: 1, type: !11, flags: DIFlagPrototyped, spFlags: DISPFlagOptimized, retainedNodes: !5)
!11 = !DISubroutineType(types: !12)
!12 = !{!13, !15, !17, !4, !19, !4}
!13 = !DIDerivedType(tag: DW_TAG_pointer_type, baseType: !14, size: 64)
!14 = !DICompositeType(tag: DW_TAG_structure_type, name: "nf_conn", file: !1, line: 1, size: 64, elements: !5)
!15 = !DIDerivedType(tag: DW_TAG_pointer_type, baseType: !16, size: 64)
!16 = !DICompositeType(tag: DW_TAG_structure_type, name: "xdp_md", file: !1, line: 1, size: 192, elements: !5)
!17 = !DIDerivedType(tag: DW_TAG_pointer_type, baseType: !18, size: 64)
!18 = !DICompositeType(tag: DW_TAG_structure_type, name: "bpf_sock_tuple", file: !1, line: 1, size: 288, elements: !5)
!19 = !DIDerivedType(tag: DW_TAG_pointer_type, baseType: !20, size: 64)
!20 = !DICompositeType(tag: DW_TAG_structure_type, name: "bpf_ct_opts", file: !1, line: 1, size: 128, elements: !5)
!30 = !DISubprogram(name: "bpf_ct_release", scope: !1, file: !1, line: 2, type: !31, flags: DIFlagPrototyped, spFlags: DISPFlagOptimized, retainedNodes: !5)
!31 = !DISubroutineType(types: !32)
!32 = !{null, !13}

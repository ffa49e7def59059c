//! vCPU set-up (CPUID, MSRs, registers, LAPIC) and the vCPU threads.

pub mod cpuid;
pub mod regs;
pub mod vcpu;

# Cloudlet A/B boot script (compiled to boot.scr with mkimage).
#
# The boot state is kept twice on this FAT partition, bootstate0.env and
# bootstate1.env, as U-Boot binary environments with a CRC. The newer copy is
# the valid one whose BOOT_SEQ is the other's plus one. Each boot decrements
# the chosen slot's tries and writes the result over the OLDER copy, so a power
# cut in the middle of fatwrite spoils only a copy that was already stale.
# Numbers are hex, as setexpr reads and writes them. The running system
# (cloudlet_proto::bootstate) follows the same rules.

setenv bs_dev "${devtype} ${devnum}:${distro_bootpart}"
if test -z "${devtype}"; then setenv bs_dev "virtio 0:1"; fi
if test -z "${cloudlet_console}"; then setenv cloudlet_console ttyAMA0; fi

# Defaults when neither copy is valid (a fresh or damaged card).
setenv BOOT_ORDER "A B"
setenv BOOT_A_LEFT 3
setenv BOOT_B_LEFT 0
setenv BOOT_SEQ 0
setenv bs_v0 0
setenv bs_v1 0
setenv bs_s0 0
setenv bs_s1 0
if load ${bs_dev} ${loadaddr} bootstate0.env; then
  if env import -c ${loadaddr} 0x1000; then setenv bs_v0 1; setenv bs_s0 ${BOOT_SEQ}; fi
fi
if load ${bs_dev} ${loadaddr} bootstate1.env; then
  if env import -c ${loadaddr} 0x1000; then setenv bs_v1 1; setenv bs_s1 ${BOOT_SEQ}; fi
fi

# Pick the newer copy; the one we write next is the other.
setenv bs_cur none
if test "${bs_v0}" = 1; then setenv bs_cur 0; fi
if test "${bs_v1}" = 1; then
  if test "${bs_v0}" = 1; then
    setexpr bs_next_seq ${bs_s0} + 1
    if test "${bs_next_seq}" = "${bs_s1}"; then setenv bs_cur 1; fi
  else
    setenv bs_cur 1
  fi
fi
if test "${bs_cur}" = none; then
  echo "cloudlet: no valid boot state; using defaults"
  setenv BOOT_ORDER "A B"; setenv BOOT_A_LEFT 3; setenv BOOT_B_LEFT 0; setenv BOOT_SEQ 0
  setenv bs_write 0
else
  load ${bs_dev} ${loadaddr} bootstate${bs_cur}.env
  env import -c ${loadaddr} 0x1000
  if test "${bs_cur}" = 0; then setenv bs_write 1; else setenv bs_write 0; fi
fi

# The first slot in BOOT_ORDER with tries left; count this try.
setenv bs_slot none
for s in ${BOOT_ORDER}; do
  if test "${bs_slot}" = none; then
    if test "${s}" = A; then
      if test ${BOOT_A_LEFT} -gt 0; then setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1; setenv bs_slot A; fi
    fi
    if test "${s}" = B; then
      if test ${BOOT_B_LEFT} -gt 0; then setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1; setenv bs_slot B; fi
    fi
  fi
done
if test "${bs_slot}" = none; then
  # Every slot used up its tries: boot the first one anyway rather than
  # nothing; the running system decides what to do about it.
  echo "cloudlet: no slot has tries left; booting the first in BOOT_ORDER"
  for s in ${BOOT_ORDER}; do if test "${bs_slot}" = none; then setenv bs_slot ${s}; fi; done
fi

setexpr BOOT_SEQ ${BOOT_SEQ} + 1
env export -c -s 0x1000 ${loadaddr} BOOT_SEQ BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
fatwrite ${bs_dev} ${loadaddr} bootstate${bs_write}.env 0x1000
echo "cloudlet: booting slot ${bs_slot} (A left ${BOOT_A_LEFT}, B left ${BOOT_B_LEFT}, seq ${BOOT_SEQ})"

# QEMU only: arm the i6300esb watchdog, if the machine has one, before the
# kernel runs, so that a kernel that hangs before init takes the watchdog over
# is reset and this try counts (U-Boot counts boots, not hangs). This
# U-Boot has no watchdog command: the device is found in PCI config space
# (ECAM of QEMU's virt machine; its memory BAR's low bits are 0) and
# programmed by hand. Each of its two
# stages is 0x7736 ticks of about 0.98 ms, about 60 s in all; Linux's driver
# stops it when it loads, and init starts it again with its own timeout.
if test "${board}" = qemu-arm; then
  pci enum
  for d in 1 2 3 4 5 6 7 8; do
    setexpr wd_cfg ${d} * 8000
    setexpr wd_cfg ${wd_cfg} + 4010000000
    setexpr.l wd_id *${wd_cfg}
    if test "${wd_id}" = 25ab8086; then
      setexpr wd_barp ${wd_cfg} + 10
      setexpr.l wd_bar *${wd_barp}
      setexpr wd_reload ${wd_bar} + c
      setexpr wd_t2 ${wd_bar} + 4
      mw.w ${wd_reload} 80; mw.w ${wd_reload} 86; mw.l ${wd_bar} 7736
      mw.w ${wd_reload} 80; mw.w ${wd_reload} 86; mw.l ${wd_t2} 7736
      pci write.b 00.0${d}.00 68 2
      echo "cloudlet: watchdog armed (i6300esb at 00.0${d}.00)"
    fi
  done
fi
setenv bootargs "console=${cloudlet_console} quiet panic=5 cloudlet.slot=${bs_slot}"
load ${bs_dev} ${kernel_addr_r} Image-${bs_slot}
load ${bs_dev} ${ramdisk_addr_r} initrd-${bs_slot}
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
echo "cloudlet: slot ${bs_slot} did not boot; resetting to try again"
reset

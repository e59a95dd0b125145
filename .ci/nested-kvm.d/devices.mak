# Devices of the nested lane's QEMU (configure --without-default-devices):
# the i440FX PC machine alone. Kconfig selects what it needs, the ISA serial
# port (the console) included; VGA, NICs, USB and the rest stay out, which
# shortens the cold build.
CONFIG_I440FX=y

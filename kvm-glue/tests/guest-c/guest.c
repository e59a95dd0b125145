/*
 * The C guest of kvm-glue's elf_vmm example: freestanding, 64-bit, DWARF.
 *
 *   gcc -g -O0 -ffreestanding -nostdlib -static -mno-red-zone -fno-pic \
 *       -fno-stack-protector -no-pie -T link.ld guest.c -o guest.elf
 *
 * The VMM enters _start on every vCPU in long mode with RDI = the vCPU's
 * number and RSP at a stack of its own. vCPU 0 runs vcpu0_main (a loop
 * that calls the recursive fact and writes a global and a struct), vCPU 1
 * runs vcpu1_main (a loop of its own, until vCPU 0 is done). Output goes
 * to port 0x3f8 a byte at a time; each vCPU says it is done with an out to
 * port 0x501; an exception the guest did not expect is reported on port
 * 0x502 with its vector, then the vCPU halts.
 *
 * With the timer on (the VMM's default), vCPU 0 programs the in-kernel
 * 8259 PIC and 8254 PIT, enables interrupts, counts ticks in timer_isr
 * and, before it is done, waits in hlt for at least two; vCPU 1 keeps
 * interrupts off. vCPU 0 runs `rounds` rounds (3; gdb may change it) and
 * prints the first three.
 */

#define PORT_CONSOLE 0x3f8
#define PORT_DONE 0x501
#define PORT_FAULT 0x502

struct point {
    int x;
    int y;
    long tag;
};

/* What gdb looks at: `p counter`, `p shared`, `watch shared.y`. */
volatile long counter;
volatile struct point shared = {1, 2, 0x5eed};
volatile unsigned long ticks;
/* How many rounds vCPU 0 runs (`set var rounds = N` from gdb). */
volatile long rounds = 3;
volatile long vcpu0_done;
volatile long vcpu1_rounds;

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static void puts_(const char *s)
{
    while (*s)
        outb(PORT_CONSOLE, (unsigned char)*s++);
}

static void put_dec(long v)
{
    char buf[24];
    int i = 0;
    if (v < 0) {
        outb(PORT_CONSOLE, '-');
        v = -v;
    }
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        outb(PORT_CONSOLE, (unsigned char)buf[--i]);
}

long fact(long n)
{
    if (n <= 1)
        return 1;
    return n * fact(n - 1);
}

/* --- interrupts: a minimal IDT (exceptions halt, vector 32 counts ticks) --- */

struct idt_gate {
    unsigned short off0;
    unsigned short sel;
    unsigned char ist;
    unsigned char type;
    unsigned short off1;
    unsigned int off2;
    unsigned int zero;
} __attribute__((packed));

static struct idt_gate idt[33];

extern char exception_stubs[]; /* 32 stubs, 16 bytes each */
extern char timer_isr[];

__asm__(".text\n"
        ".align 16\n"
        ".globl exception_stubs\n"
        "exception_stubs:\n"
        ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
        "  .balign 16\n"
        "  mov $\\v, %al\n"
        "  mov $0x502, %dx\n"
        "  out %al, %dx\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".endr\n"
        ".globl timer_isr\n"
        "timer_isr:\n"
        "  push %rax\n"
        "  lock incq ticks(%rip)\n"
        "  mov $0x20, %al\n"
        "  out %al, $0x20\n" /* EOI to the master PIC */
        "  pop %rax\n"
        "  iretq\n");

static void set_gate(int v, char *handler)
{
    unsigned long a = (unsigned long)handler;
    idt[v].off0 = (unsigned short)a;
    idt[v].sel = 0x8;
    idt[v].ist = 0;
    idt[v].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    idt[v].off1 = (unsigned short)(a >> 16);
    idt[v].off2 = (unsigned int)(a >> 32);
    idt[v].zero = 0;
}

static void idt_load(void)
{
    struct {
        unsigned short limit;
        unsigned long base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (unsigned long)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

static void timer_start(void)
{
    /* 8259A: ICW1..ICW4, IRQ 0-7 at vectors 32-39, only IRQ 0 unmasked. */
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xfe);
    outb(0xa1, 0xff);
    /* 8254 channel 0, mode 2, about 100 Hz (1193182 / 11932). */
    outb(0x43, 0x34);
    outb(0x40, 11932 & 0xff);
    outb(0x40, 11932 >> 8);
    __asm__ volatile("sti");
}

/* --- the two vCPUs' code --- */

void vcpu0_main(long timer)
{
    if (timer)
        timer_start();
    for (long round = 0; round < rounds; round++) {
        long f = fact(5);
        counter = counter + f;
        shared.x = (int)round;
        if (round >= 3)
            continue; /* quiet after three rounds */
        puts_("vcpu0: round ");
        put_dec(round);
        puts_(": fact(5) = ");
        put_dec(f);
        puts_(", counter = ");
        put_dec(counter);
        puts_("\n");
    }
    vcpu0_done = 1;
}

static void vcpu1_work(void)
{
    shared.y = shared.y + 1;
    vcpu1_rounds = vcpu1_rounds + 1;
}

void vcpu1_main(void)
{
    while (!vcpu0_done)
        vcpu1_work();
    puts_("vcpu1: ");
    put_dec(vcpu1_rounds);
    puts_(" rounds while vcpu0 ran\n");
}

void guest_main(long cpu, long timer)
{
    for (int v = 0; v < 32; v++)
        set_gate(v, exception_stubs + 16 * v);
    set_gate(32, timer_isr);
    idt_load();
    if (cpu == 0)
        vcpu0_main(timer);
    else
        vcpu1_main();
    if (cpu == 0 && timer) {
        /* Interrupts are on: each hlt waits for the next tick. */
        while (ticks < 2)
            __asm__ volatile("hlt");
        puts_("vcpu0: timer ticks: ");
        put_dec((long)ticks);
        puts_("\n");
    }
    outb(PORT_DONE, (unsigned char)cpu);
}

/* The entry: RDI = vCPU number, RSI = 1 for the timer, RSP 16-aligned.
 * `.cfi_undefined rip` ends gdb's backtrace here. */
__asm__(".section .text.start, \"ax\"\n"
        ".globl _start\n"
        ".type _start, @function\n"
        "_start:\n"
        "  .cfi_startproc\n"
        "  .cfi_undefined rip\n"
        "  xor %ebp, %ebp\n"
        "  call guest_main\n"
        "2: cli\n"
        "  hlt\n"
        "  jmp 2b\n"
        "  .cfi_endproc\n"
        ".size _start, . - _start\n"
        ".text\n");

/*
 * libdebuginfod.so.1 for the gdb the nested lanes carry into their VMs
 * (.ci/nested-kvm, .ci/nested-vmx). Debian's gdb-minimal links libdebuginfod,
 * and through it libcurl and 14.7 MB of TLS, Kerberos and LDAP libraries,
 * nearly twice gdb's own 8.1 MB, to unpack on an emulated CPU at every boot.
 * gdb asks a debuginfod server only when DEBUGINFOD_URLS names one; the VMs
 * set none. These are the symbols gdb 13 binds (nm -D --undefined-only),
 * with their version nodes (debuginfod-stub.map): no client, nothing found.
 */
#include <errno.h>
#include <stddef.h>

typedef struct debuginfod_client debuginfod_client;
typedef int (*debuginfod_progressfn_t)(debuginfod_client *c, long a, long b);

debuginfod_client *debuginfod_begin(void) { return NULL; }
void debuginfod_end(debuginfod_client *c) { (void)c; }

static int not_found(char **path)
{
    if (path)
        *path = NULL;
    return -ENOSYS;
}

int debuginfod_find_debuginfo(debuginfod_client *c, const unsigned char *id, int len, char **path)
{
    (void)c, (void)id, (void)len;
    return not_found(path);
}

int debuginfod_find_executable(debuginfod_client *c, const unsigned char *id, int len, char **path)
{
    (void)c, (void)id, (void)len;
    return not_found(path);
}

int debuginfod_find_source(debuginfod_client *c, const unsigned char *id, int len, const char *file,
                           char **path)
{
    (void)c, (void)id, (void)len, (void)file;
    return not_found(path);
}

void debuginfod_set_progressfn(debuginfod_client *c, debuginfod_progressfn_t fn) { (void)c, (void)fn; }
void debuginfod_set_user_data(debuginfod_client *c, void *data) { (void)c, (void)data; }
void *debuginfod_get_user_data(debuginfod_client *c)
{
    (void)c;
    return NULL;
}
